"""`reconciler verify [REPO] [--host NAME] [--json] [--lab | --known-hosts F --identity F]`

Checks that the fleet really works: per host and per peer, the live firewall admits IKE/ESP
and only protected mesh traffic, both sides declare matching IPsec connections with each
other's real keys, the IKE and CHILD SAs are up, charon logged no new errors, a ping over the
mesh is ESP on the wire, the sites answer with the declared headers and the AppArmor profiles
parse. Exit 0 only if every check that ran passed (skips say why they could not run here).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from reconciler.commands import Subcommands
from reconciler.errors import ReconcilerError


def register(sub: Subcommands) -> None:
    from reconciler.commands.plan import add_connection_args

    p = sub.add_parser("verify", help="check that the mesh, firewall, sites and profiles really work")
    add_connection_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verbose", "-v", action="store_true", help="show what was seen for failed checks too")
    p.add_argument("--no-datapath", action="store_true", help="skip the ping + capture probe")
    p.add_argument(
        "--keep-cursor",
        action="store_true",
        help="do not advance the charon log cursor (the next run sees the same lines again)",
    )
    p.add_argument(
        "--host-timeout", type=float, default=60.0, metavar="S", help="per-host timeout (default 60)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler import usecases
    from reconciler.commands.plan import make_pool, prepare
    from reconciler.engine.planview import use_color
    from reconciler.verify import VerifyOptions
    from reconciler.verify.report import render_text, to_json

    prepared = prepare(args, render=False)  # verify reads live state; it renders nothing
    if isinstance(prepared, int):
        return prepared
    fleet, reach = prepared
    options = VerifyOptions(
        host_timeout=args.host_timeout,
        datapath=not args.no_datapath,
        advance_cursor=not args.keep_cursor,
    )

    async def main() -> Any:
        async with make_pool(fleet, reach, args) as pool:
            return await usecases.verify(fleet, args.host, pool, options=options)

    try:
        report = asyncio.run(main())
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(to_json(report))
    else:
        sys.stdout.write(render_text(report, color=use_color(sys.stdout), verbose=args.verbose))
    code: int = report.exit_code()
    return code
