"""The CLI's commands, one module each with a ``register(sub: Subcommands)`` (see cli.py)."""

from __future__ import annotations

import argparse
from typing import TypeAlias

# What cli.py hands each command's ``register``: ``parser.add_subparsers(...)``.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
