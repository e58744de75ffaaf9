"""`reconciler lab up|status|down`: local test hosts in network namespaces (docs/LAB.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reconciler.commands import Subcommands


def register(sub: Subcommands) -> None:
    p = sub.add_parser("lab", help="local test hosts: network namespaces or QEMU guests (up, status, down)")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    lab_sub.required = True

    up = lab_sub.add_parser("up", help="bring lab hosts up and leave them running")
    src = up.add_mutually_exclusive_group()
    src.add_argument(
        "--hosts",
        type=int,
        default=None,
        metavar="N",
        help="N hosts named lab1..labN at 198.18.0.11.. (default 3, at most 4000; with --vm "
        "at most 200, at 192.0.2.11..)",
    )
    src.add_argument(
        "--fleet",
        type=Path,
        default=None,
        metavar="REPO",
        help="one lab host per fleet host, with the fleet's names and addresses",
    )
    up.add_argument(
        "--vm",
        action="store_true",
        help="each host a QEMU guest with a real Debian 12 kernel (ipip, kernel ESP, AppArmor); "
        "builds the cached base image first if needed (docs/LAB.md)",
    )
    up.add_argument("--prefix", default=None, help="name prefix (rcl + up to 5 of [a-z0-9])")
    up.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for another lab to free the machine-wide lab lock (default 600)",
    )
    up.add_argument("--json", action="store_true", help="print the lab's info as JSON")

    st = lab_sub.add_parser("status", help="the running lab and what this kernel can do")
    st.add_argument("--json", action="store_true")

    ex = lab_sub.add_parser(
        "exec",
        help="run a command inside a lab host, without SSH (e.g. a hand edit to show drift)",
    )
    ex.add_argument("host", help="lab host name")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    img = lab_sub.add_parser("image", help="build (or show) the VM lab's cached Debian 12 base image")
    img.add_argument("--rebuild", action="store_true", help="build it again even if it is cached")
    img.add_argument("--check", action="store_true", help="only say whether it is built (exit 1 if not)")
    img.add_argument("--json", action="store_true")

    down = lab_sub.add_parser("down", help="remove a lab (also crash leftovers)")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--prefix", default=None, help="the lab to remove (default: the current one)")
    which.add_argument("--all", action="store_true", help="remove every reconciler lab on this machine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.lab import LabError

    try:
        if args.lab_command == "up":
            return _up(args)
        if args.lab_command == "status":
            return _status(args)
        if args.lab_command == "exec":
            return _exec(args)
        if args.lab_command == "image":
            return _image(args)
        return _down(args)
    except LabError as exc:
        print(f"reconciler lab: {exc}", file=sys.stderr)
        return 1


def _made_for(info: Any) -> str:
    if info.fleet is None:
        return "no fleet (`--lab` works only with a lab made by `reconciler lab up --fleet REPO`)"
    return f"{info.fleet.describe()} (`--lab` refuses any other fleet)"


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "prefix": info.prefix,
        "fleet": {"name": info.fleet.name, "id": info.fleet.id} if info.fleet is not None else None,
        "state_dir": str(info.state_dir),
        "known_hosts": str(info.known_hosts),
        "client_key": str(info.client_key),
        "bridge": info.bridge,
        "kind": info.kind,
        "ssh_netns": info.ssh_netns,
        "hosts": [
            {"name": h.name, "address": h.address, "netns": h.netns, "pid": h.pid, "root": str(h.root)}
            for h in info.hosts
        ],
    }


def _up(args: argparse.Namespace) -> int:
    from reconciler.errors import ReconcilerError
    from reconciler.fleet.load import load_fleet
    from reconciler.lab import Lab, LabError, LabFleet, LabHostSpec, specs_from_fleet
    from reconciler.lab.lab import MAX_HOSTS
    from reconciler.lab.model import big_address

    made_for: LabFleet | None = None  # `--lab` later refuses a fleet the lab was not made for
    if args.fleet is not None:
        try:
            fleet = load_fleet(args.fleet)
            specs = specs_from_fleet(fleet)
        except LabError:
            raise
        except ReconcilerError as exc:
            print(f"reconciler lab: fleet {args.fleet}:\n{exc}", file=sys.stderr)
            return 1
        made_for = LabFleet.of(fleet)
    else:
        n = 3 if args.hosts is None else args.hosts
        most = 200 if args.vm else MAX_HOSTS
        if not 1 <= n <= most:
            print(f"reconciler lab: --hosts must be between 1 and {most}", file=sys.stderr)
            return 2
        if args.vm:  # the VM tier's bridge network is the documentation /24
            specs = [LabHostSpec(name=f"lab{i + 1}", address=f"192.0.2.{11 + i}") for i in range(n)]
        else:
            specs = [LabHostSpec(name=f"lab{i + 1}", address=big_address(i)) for i in range(n)]

    def progress(msg: str) -> None:
        print(f"reconciler lab: {msg}", file=sys.stderr, flush=True)

    lab = Lab.up(
        specs, prefix=args.prefix, lock_timeout=args.wait, vm=args.vm, progress=progress, fleet=made_for
    )
    lab.detach()
    info = lab.info
    if args.json:
        print(json.dumps(_info_dict(info), indent=2))
        return 0
    if info.kind == "vm":
        print(
            f"lab {info.prefix} is up ({len(info.hosts)} QEMU guests in {lab.timings.get('build', 0):.0f} s, "
            f"bridge {info.bridge} 192.0.2.254 in network namespace {info.ssh_netns})"
        )
    else:
        took = lab.timings.get("build", 0)
        print(
            f"lab {info.prefix} is up ({len(info.hosts)} hosts in {took:.1f} s, "
            f"bridge {info.bridge} 192.0.2.254 and 198.19.255.254)"
        )
    print(f"made for: {_made_for(info)}")
    for h in info.hosts:
        print(f"  {h.name:<20} {h.address:<15} netns {h.netns}")
    print(f"known_hosts: {info.known_hosts}")
    print(f"client key:  {info.client_key}")
    first = info.hosts[0]
    inside = f"ip netns exec {info.ssh_netns} " if info.ssh_netns else ""
    print(
        f"try: {inside}ssh -i {info.client_key} -o UserKnownHostsFile={info.known_hosts} "
        f"-o StrictHostKeyChecking=yes root@{first.address} hostname"
    )
    print(f"stop: reconciler lab down --prefix {info.prefix}")
    return 0


def _exec(args: argparse.Namespace) -> int:
    from reconciler.lab import Lab

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("reconciler lab exec: give a command: lab exec HOST -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    info = Lab.current()
    if info is None:
        print("reconciler lab exec: no lab is up (reconciler lab up)", file=sys.stderr)
        return 1
    try:
        info.host(args.host)
    except KeyError:
        names = ", ".join(h.name for h in info.hosts)
        print(f"reconciler lab exec: no host {args.host} in lab {info.prefix} ({names})", file=sys.stderr)
        return 1
    proc = Lab.attach(info.prefix).exec(args.host, argv, timeout=600)
    sys.stdout.buffer.write(proc.stdout)
    sys.stderr.buffer.write(proc.stderr)
    return proc.returncode


def _image(args: argparse.Namespace) -> int:
    import time

    from reconciler.lab import vm_image

    if args.check:
        img = vm_image.cached_image()
        if args.json:
            print(json.dumps({"key": vm_image.image_key(), "built": img is not None}))
        else:
            state = f"built in {img.directory}" if img else "not built (reconciler lab image)"
            print(f"VM base image {vm_image.image_key()}: {state}")
        return 0 if img else 1
    t0 = time.monotonic()
    img = vm_image.ensure_image(
        rebuild=args.rebuild, progress=lambda m: print(f"reconciler lab: {m}", file=sys.stderr, flush=True)
    )
    seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps({"key": img.key, "directory": str(img.directory), "seconds": round(seconds, 1)}))
    else:
        print(f"VM base image {img.key}: {img.directory} ({seconds:.0f} s)")
    return 0


def _status(args: argparse.Namespace) -> int:
    from reconciler.lab import Lab, probe_capabilities
    from reconciler.lab.cleanup import all_prefixes
    from reconciler.lab.lock import owner_alive, read_owner, waiters

    caps = probe_capabilities()
    current = Lab.current()
    owner = read_owner()
    others = [p for p in all_prefixes() if current is None or p != current.prefix]
    if args.json:
        out = {
            "current": _info_dict(current) if current else None,
            "lock_owner": (
                {
                    "prefix": owner.prefix,
                    "pid": owner.pid,
                    "detached": owner.detached,
                    "alive": owner_alive(owner),
                }
                if owner
                else None
            ),
            "other_labs": others,
            "waiting_pids": waiters(),
            "capabilities": caps.as_dict(),
        }
        print(json.dumps(out, indent=2))
        return 0
    if current:
        kind = f", QEMU guests in netns {current.ssh_netns}" if current.kind == "vm" else ""
        print(f"current lab: {current.prefix} ({len(current.hosts)} hosts{kind})")
        print(f"  made for: {_made_for(current)}")
        for h in current.hosts:
            print(f"  {h.name:<20} {h.address:<15} netns {h.netns}")
        print(f"  known_hosts: {current.known_hosts}\n  client key:  {current.client_key}")
    else:
        print("current lab: none (start one with `reconciler lab up`)")
    if owner and (current is None or owner.prefix != current.prefix):
        state = "alive" if owner_alive(owner) else "dead (its lock is broken on the next `lab up`)"
        print(f"lab lock held by {owner.prefix} (pid {owner.pid}): {state}")
    waiting = waiters()
    if waiting:
        print(f"waiting for the lab lock: {len(waiting)} process(es) (pids {', '.join(map(str, waiting))})")
    if others:
        print(f"other labs / leftovers: {', '.join(others)} (remove: reconciler lab down --prefix P)")
    print("\nkernel capabilities for the lab:")
    for c in caps.items:
        print(f"  {c}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from reconciler.lab import Lab
    from reconciler.lab.cleanup import down_all, down_prefix

    if args.all:
        results = down_all()
        if not results:
            print("no reconciler lab on this machine")
    else:
        prefix = args.prefix
        if prefix is None:
            current = Lab.current()
            if current is None:
                print("reconciler lab: no current lab; use --prefix P or --all", file=sys.stderr)
                return 1
            prefix = current.prefix
        results = {prefix: down_prefix(prefix)}
    failed = False
    for prefix, left in results.items():
        if left:
            failed = True
            print(f"lab {prefix}: could not remove: {', '.join(left)}", file=sys.stderr)
        else:
            print(f"lab {prefix} removed")
    return 1 if failed else 0
