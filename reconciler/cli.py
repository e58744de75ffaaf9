"""The command line: ``reconciler validate|render|plan|apply|keys|drift|verify|run|sync|lab``.

Each command lives in its own module under ``reconciler.commands`` with a ``register``
function that adds its sub-parser; the chosen command's ``run(args) -> int`` is the exit code.
Exit codes: 0 ok, 1 failure (bad input, a host failed), 2 usage error (argparse) or, for
``plan``, changes pending.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from reconciler import __version__
from reconciler import log as logsetup

COMMAND_MODULES = (
    "validate",
    "render",
    "plan",
    "keys",
    "drift",
    "verify",
    "run",
    "lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconciler",
        description="GitOps reconciler for a fleet of Linux servers.",
    )
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="log level for stderr (default WARNING)")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"reconciler.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure(json=True if args.log_json else None, level=args.log_level)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    return code


def _stdout_closed() -> int:
    """The reader went away (``reconciler lab status | head -1``): stop quietly, like a Unix
    tool (SIGPIPE's exit status), and keep Python from failing again when it flushes stdout
    at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
