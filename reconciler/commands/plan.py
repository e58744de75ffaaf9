"""`reconciler plan` and `reconciler apply`.

plan:  observe every selected host and print what apply would change (per host, per resource,
       unified diffs; coloured on a terminal unless NO_COLOR). Exit 0 in sync, 2 changes
       pending, 1 an error (a host that cannot be reached or observed is an error; the others
       are still planned).
apply: the same plan, then (after confirmation on a terminal, or with --yes) applies it to the
       hosts concurrently and prints per-host results. Exit 0 when every host is applied and
       verified (or was in sync), 3 when some hosts were only partly applied (some changes
       landed, others failed or were held back) and none failed outright, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.commands import Subcommands
from reconciler.commands.bounds import add_render_args, limits_from_args, load_and_render
from reconciler.errors import FleetInvalid, ReconcilerError

if TYPE_CHECKING:  # imported where used: `reconciler --help` loads none of them
    from reconciler.engine.fleet import FleetResult, HostOutcome, Progress
    from reconciler.fleet.model import Fleet
    from reconciler.host.connection import ConnectionPool
    from reconciler.lab.model import LabInfo

MANY_HOSTS = 5  # above this, a line-based progress display on a terminal


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--known-hosts/--identity or --lab: how to reach the hosts with strict host keys."""
    p.add_argument("repo", nargs="?", default=".", help="fleet repo directory (default: .)")
    p.add_argument("--host", action="append", default=[], metavar="NAME", help="only this host (repeatable)")
    p.add_argument("--known-hosts", metavar="FILE", help="known_hosts file with the hosts' SSH keys")
    p.add_argument(
        "--identity", action="append", default=[], metavar="FILE", help="SSH private key (repeatable)"
    )
    p.add_argument(
        "--lab",
        action="store_true",
        help="use the lab started by `reconciler lab up --fleet REPO` (refused: a lab for another fleet)",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S", help="SSH connect timeout")
    p.add_argument("--command-timeout", type=float, default=120.0, metavar="S", help="per-command timeout")
    p.add_argument(
        "--time-scale",
        type=float,
        metavar="F",
        help="multiply every per-command timeout by F >= 1 for slow hosts (default 1; 5 on a VM lab)",
    )


@dataclass(frozen=True)
class Reach:
    known_hosts: str | None
    identities: tuple[str, ...]
    address_override: dict[str, str]
    netns: str | None = None  # dial from inside this network namespace (a VM lab)
    time_scale: float | None = None  # per-command timeouts x this (None: --time-scale, default 1)


# emulated (TCG) guests run commands several times slower than a real host: a service start
# that takes 10 s on a host can take a minute there
VM_TIME_SCALE = 5.0


def reach_from_args(args: argparse.Namespace, fleet: Fleet) -> Reach:
    """How to reach ``fleet``'s hosts. ``--lab``: only a lab made for this very fleet."""
    if args.lab:
        from reconciler.lab import Lab

        info = Lab.current()
        if info is None:
            raise ReconcilerError("--lab: no lab is running (start one: `reconciler lab up --fleet REPO`)")
        check_lab_for(info, fleet, getattr(args, "host", None) or ())
        return Reach(
            str(info.known_hosts),
            (str(info.client_key),),
            {h.name: h.address for h in info.hosts},
            info.ssh_netns or None,
            VM_TIME_SCALE if info.kind == "vm" else None,
        )
    return Reach(args.known_hosts, tuple(args.identity), {})


def check_lab_for(info: LabInfo, fleet: Fleet, hosts: Sequence[str] = ()) -> None:
    """Refuse a lab (``LabInfo``) not made for ``fleet`` (by fleet id), or lacking one of the
    fleet's hosts (selected ``hosts``, or all): a host missing from the lab would be dialled at
    its real public address."""
    from reconciler.engine.identity import fleet_id

    this = f"fleet '{fleet.name}' (id {fleet_id(fleet)})"
    fix = "start a lab for it: `reconciler lab down && reconciler lab up --fleet REPO`"
    if info.fleet is None:
        raise ReconcilerError(
            f"--lab: lab {info.prefix} was made for no fleet (`reconciler lab up --hosts N`); "
            f"this is {this}: refusing; {fix}"
        )
    if info.fleet.id != fleet_id(fleet):
        raise ReconcilerError(
            f"--lab: lab {info.prefix} was made for {info.fleet.describe()}; this is {this}: refusing; {fix}"
        )
    in_lab = {h.name for h in info.hosts}
    missing = [h for h in (hosts or [h.name for h in fleet.hosts]) if h not in in_lab]
    if missing:
        raise ReconcilerError(
            f"--lab: lab {info.prefix} has no host {', '.join(missing)} (made from an older version of "
            f"{this}?): refusing; {fix}"
        )


def load(repo: str) -> Fleet:
    from reconciler.fleet.load import load_fleet

    return load_fleet(Path(repo))


def make_pool(fleet: Fleet, reach: Reach, args: argparse.Namespace) -> ConnectionPool:
    from reconciler.host.connection import ConnectionPool, targets_for

    targets = targets_for(
        fleet,
        known_hosts=reach.known_hosts,
        client_keys=reach.identities,
        address_override=reach.address_override or None,
        netns=reach.netns,
    )
    return ConnectionPool(
        targets,
        connect_timeout=args.connect_timeout,
        command_timeout=args.command_timeout,
        max_concurrency=100,
        time_scale=getattr(args, "time_scale", None) or reach.time_scale or 1.0,
    )


def register(sub: Subcommands) -> None:
    p = sub.add_parser("plan", help="show what apply would change on each host (changes nothing)")
    add_connection_args(p)
    add_adopt_arg(p, "plan the takeover of")
    add_render_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_plan)

    a = sub.add_parser("apply", help="plan, confirm, then apply the plan to the hosts")
    add_connection_args(a)
    add_adopt_arg(a, "take over")
    add_render_args(a)
    a.add_argument("--json", action="store_true", help="machine-readable output (needs --yes)")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument(
        "--firewall-window",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds before a host restores its old firewall rules unless confirmed (default 10)",
    )
    a.set_defaults(func=run_apply)


def add_adopt_arg(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--adopt",
        action="store_true",
        help=f"{verb} hosts whose /etc/reconciler/identity names another fleet or host name "
        "(without it they are refused); their old inventory is never pruned",
    )


def _progress(total: int) -> Progress | None:
    from reconciler.engine.planview import progress_line

    if total <= MANY_HOSTS or not sys.stderr.isatty():
        return None
    done = [0]

    def show(o: HostOutcome) -> None:
        done[0] += 1
        print(progress_line(o, done[0], total), file=sys.stderr, flush=True)

    return show


def prepare(args: argparse.Namespace, *, render: bool = True) -> tuple[Any, Reach] | int:
    """The fleet and how to reach its hosts, or an exit code after printing why not. With
    ``render`` (plan, apply) the selected hosts are rendered here, in a worker under the render
    limits (``add_render_args``); the engine uses those results (a host whose render failed is
    an error of that host, as before)."""
    from reconciler.engine.fleet import seed_rendered, select_hosts

    try:
        if render:
            fleet, rendered = load_and_render(
                lambda: load(args.repo), lambda f: select_hosts(f, args.host), limits_from_args(args)
            )
            seed_rendered(fleet, rendered)
        else:
            fleet = load(args.repo)
        reach = reach_from_args(args, fleet)
    except FleetInvalid as err:
        print(f"fleet {args.repo} does not validate:\n{err}", file=sys.stderr)
        return 1
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return fleet, reach


def run_plan(args: argparse.Namespace) -> int:
    from reconciler import usecases
    from reconciler.engine.planview import render_plan, to_json, use_color

    prepared = prepare(args)
    if isinstance(prepared, int):
        return prepared
    fleet, reach = prepared

    async def main() -> FleetResult:
        async with make_pool(fleet, reach, args) as pool:
            total = len(args.host) or len(fleet.hosts)
            return await usecases.plan(fleet, args.host, pool, progress=_progress(total), adopt=args.adopt)

    try:
        result = asyncio.run(main())
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(to_json(result, mode="plan"))
    else:
        sys.stdout.write(render_plan(result, color=use_color(sys.stdout)))
    code: int = result.exit_code()
    return code


def run_apply(args: argparse.Namespace) -> int:
    from reconciler import usecases
    from reconciler.engine.fleet import CHANGES
    from reconciler.engine.planview import render_apply, render_plan, to_json, use_color

    if not args.yes and not sys.stdin.isatty():
        print("refusing to apply: stdin is not a terminal and --yes was not given", file=sys.stderr)
        return 1
    prepared = prepare(args)
    if isinstance(prepared, int):
        return prepared
    fleet, reach = prepared
    color = use_color(sys.stdout)

    async def main() -> tuple[Any, Any]:
        async with make_pool(fleet, reach, args) as pool:
            total = len(args.host) or len(fleet.hosts)
            planned = await usecases.plan(fleet, args.host, pool, progress=_progress(total), adopt=args.adopt)
            if not args.json:
                sys.stdout.write(render_plan(planned, color=color))
                sys.stdout.flush()
            changing = [o for o in planned.hosts if o.status == CHANGES]
            if not changing:
                return planned, None
            if not args.yes:
                prompt = f"\nApply these changes to {len(changing)} host(s)? Only 'yes' is accepted: "
                answer = await asyncio.get_running_loop().run_in_executor(None, input, prompt)
                if answer.strip() != "yes":
                    return planned, "cancelled"
            result = await usecases.apply_planned(
                planned, pool, progress=_progress(len(changing)), firewall_window=args.firewall_window
            )
            return planned, result

    try:
        planned, result = asyncio.run(main())
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except EOFError:
        print("\napply cancelled (no answer)", file=sys.stderr)
        return 1
    if result == "cancelled":
        print("apply cancelled; nothing changed", file=sys.stderr)
        return 1
    final = planned if result is None else result
    if args.json:
        sys.stdout.write(to_json(final, mode="apply"))
    else:
        if result is None:
            print(
                "Nothing to apply."
                if final.exit_code() == 0
                else "Nothing applied (hosts with errors above)."
            )
        else:
            sys.stdout.write("\n" + render_apply(result, color=color))
    code = final.exit_code()
    return code if code in (0, 3) else 1
