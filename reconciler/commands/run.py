"""`reconciler run`: not built yet (placeholder so the CLI lists every command)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="(not built yet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("reconciler run: not built yet", file=sys.stderr)
    return 1
