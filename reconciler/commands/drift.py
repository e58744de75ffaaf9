"""`reconciler drift`: one drift scan of the selected hosts (see docs/DRIFT.md).

Snapshots each host's recorded paths into the history repo, mails drift (and new AppArmor
denials with suggested rules) through the durable outbox, and prints a per-host summary.
Exit 0 when every host was scanned, 1 when any host failed (the others are still scanned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.commands import Subcommands
from reconciler.errors import FleetInvalid, ReconcilerError

if TYPE_CHECKING:
    from reconciler.drift.scan import HostDrift
    from reconciler.fleet.model import Fleet
    from reconciler.host.connection import ConnectionPool


def default_state_dir() -> Path:
    env = os.environ.get("RECONCILER_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/reconciler")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "reconciler"


def register(sub: Subcommands) -> None:
    from reconciler.commands.plan import add_connection_args

    p = sub.add_parser("drift", help="snapshot hosts into the /etc history, mail drift and AppArmor denials")
    add_connection_args(p)
    p.add_argument(
        "--state", metavar="DIR", help="state dir (outbox, cursors, hash key); default /var/lib/reconciler"
    )
    p.add_argument("--history", metavar="DIR", help="history git repo (default: STATE/history)")
    p.add_argument("--history-remote", metavar="URL", help="push the history repo here after the scan")
    p.add_argument(
        "--history-branches",
        choices=("main", "host"),
        default="main",
        help="push main (default), or one branch per host, refs/heads/hosts/<host> (the sharded daemon's)",
    )
    p.add_argument("--fleet-commit", metavar="SHA", help="fleet commit in force (default: the repo's HEAD)")
    p.add_argument(
        "--enforce",
        action="store_true",
        help="with drift mode enforce: the engine puts managed files back (a full apply)",
    )
    p.add_argument("--no-mail", action="store_true", help="queue mail but do not deliver it now")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=run)


async def _fleet_commit(repo: str) -> str | None:
    """The fleet repo's HEAD (what is in force for a CLI scan), or None if it is not a git repo."""
    from reconciler.gitrepo import GitRepo

    git_dir = Path(repo) / ".git"
    if not git_dir.exists():
        return None
    git = GitRepo(git_dir)
    try:
        return await git.resolve("HEAD")
    finally:
        git.close()


def run(args: argparse.Namespace) -> int:
    from reconciler.commands.plan import load, make_pool, reach_from_args

    try:
        fleet = load(args.repo)
        reach = reach_from_args(args, fleet)
    except FleetInvalid as err:
        print(str(err), file=sys.stderr)
        return 1
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(args, fleet, make_pool(fleet, reach, args)))
    except ReconcilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, fleet: Fleet, pool: ConnectionPool) -> int:
    from reconciler import usecases
    from reconciler.engine.fleet import select_hosts

    state = Path(args.state) if args.state else default_state_dir()
    drift = usecases.Drift.open(
        state,
        Path(args.history) if args.history else None,
        remote=args.history_remote,
        branches=args.history_branches,
    )
    history, outbox = drift.history, drift.outbox
    assert outbox is not None
    hosts = select_hosts(fleet, args.host)
    async with pool:
        run = await usecases.drift_scan(
            drift,
            fleet,
            pool,
            hosts,
            fleet_commit=args.fleet_commit or await _fleet_commit(args.repo),
            enforce=usecases.enforce_with_engine(fleet, pool) if args.enforce else None,
            push_always=True,
        )
    results, push_error = run.hosts, run.push_error
    delivery: dict[str, object] = {}
    mail = fleet.notifications.mail
    if mail is not None and not args.no_mail:
        rep = await outbox.deliver_due(mail.smtp)
        delivery = {"sent": rep.sent, "failed": rep.failed, "error": rep.error}
    counts = outbox.counts()
    if args.json:
        print(
            json.dumps(
                {
                    "hosts": [r.as_dict() for r in results],
                    "history": str(history.path),
                    "push_error": push_error,
                    "mail": {**delivery, "pending": counts.pending, "sent_total": counts.sent},
                },
                indent=2,
            )
        )
    else:
        for r in results:
            print(_summary(r))
            for s in r.suggestions:
                print("  AppArmor: " + s.text().replace("\n", "\n  "))
        if push_error:
            print(f"history push failed: {push_error}")
        if delivery:
            line = f"mail: {delivery['sent']} sent, {counts.pending} pending"
            if delivery.get("error"):
                line += f" (last error: {delivery['error']})"
            print(line)
    return 0 if all(r.ok for r in results) else 1


def _summary(r: HostDrift) -> str:
    if not r.ok:
        return f"{r.host}: FAILED: {r.error}"
    if r.baseline:
        return f"{r.host}: initial snapshot recorded ({r.entries} paths) in {r.seconds:.2f} s"
    parts = [f"{r.host}:"]
    if r.commit:
        parts.append(f"{len(r.changed)} changed, {len(r.new)} new, {len(r.removed)} removed")
        parts.append(f"(commit {r.commit[:12]}, {len(r.drift)} drift)")
    else:
        parts.append("no change")
    if r.managed_drift:
        parts.append(f"; {len(r.managed_drift)} managed file(s) differ from the fleet: {r.enforcement}")
    if r.mails_queued:
        parts.append(f"; {r.mails_queued} mail(s) queued")
    for w in r.warnings:
        parts.append(f"; warning: {w}")
    return " ".join(parts)
