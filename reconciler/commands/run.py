"""`reconciler run [--config FILE]` (the daemon) and `reconciler sync [--url URL] [--host H ...]`.

``sync`` asks a running daemon to fetch the fleet repo and reconcile every host (or the named
ones) now, through ``POST /sync`` with the bearer token ``server.sync_token``
(``RECONCILER_SERVER_SYNC_TOKEN`` or ``..._FILE``).

``sync --allow-rollback COMMIT [--by NAME]`` lets the daemon move its applied commit back to an
older one (it refuses any head that does not descend from the applied commit otherwise). The
commit must be on the fetched branch and verify like any new commit; the daemon records who
asked (``--by``, default ``user@host``, and the address the request came from) and when, mails
the admins, and answers once it is done (exit 0) or why not (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
from typing import Any

from reconciler import log as logsetup
from reconciler.commands import Subcommands
from reconciler.daemon.config import ConfigError, load_config, require_runnable
from reconciler.errors import ReconcilerError


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "run",
        help="run the reconciler daemon (webhooks, polling, drift schedule)",
        description="Run the daemon. Settings come from --config (YAML) and RECONCILER_* variables; "
        "see docs/DEPLOY.md.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: $RECONCILER_CONFIG)")
    p.set_defaults(func=run)

    s = sub.add_parser(
        "sync",
        help="ask a running daemon to fetch and reconcile now",
        description="POST /sync to a running daemon (bearer token from the config or environment).",
    )
    s.add_argument("--config", metavar="FILE", help="YAML config file (for the port and the sync token)")
    s.add_argument("--url", help="daemon base URL (default: http://127.0.0.1:<server.port>)")
    s.add_argument("--host", action="append", default=[], metavar="NAME", help="only this host (repeatable)")
    s.add_argument(
        "--forget",
        action="append",
        default=[],
        metavar="NAME",
        help="acknowledge a host shown as removed from the fleet: drop it from /status (repeatable)",
    )
    s.add_argument(
        "--allow-rollback",
        metavar="COMMIT",
        help="move the applied commit back to COMMIT (on the branch, verified); see docs/DEPLOY.md",
    )
    s.add_argument("--by", metavar="NAME", help="who allows the rollback (default: user@host)")
    s.add_argument(
        "--timeout", type=float, help="seconds to wait for the daemon (default 10; 300 with --allow-rollback)"
    )
    s.set_defaults(func=sync)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        require_runnable(config)
    except ConfigError as err:
        print(f"reconciler run: {err}", file=sys.stderr)
        return 1
    # The daemon's own log settings win over the CLI default (WARNING) unless asked otherwise.
    logsetup.configure(json=True if args.log_json else config.log_json, level=config.log_level)
    from reconciler.daemon.daemon import run_daemon

    try:
        return run_daemon(config)
    except ReconcilerError as err:
        print(f"reconciler run: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. the HTTP port is taken, the state directory is not writable
        print(f"reconciler run: {err.strerror or err}", file=sys.stderr)
        return 1


def sync(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"reconciler sync: {err}", file=sys.stderr)
        return 1
    token = config.server.sync_token
    if not token:
        print(
            "reconciler sync: no sync token: set server.sync_token or RECONCILER_SERVER_SYNC_TOKEN",
            file=sys.stderr,
        )
        return 1
    host = config.server.listen if config.server.listen not in ("0.0.0.0", "::", "") else "127.0.0.1"  # noqa: S104
    url = (args.url or f"http://{host}:{config.server.port}").rstrip("/") + "/sync"
    rollback = args.allow_rollback
    if sum(map(bool, (args.forget, args.host, rollback is not None))) > 1:
        print("reconciler sync: --forget, --host and --allow-rollback do not go together", file=sys.stderr)
        return 1
    payload: dict[str, Any]
    if rollback is not None:
        payload = {"allow_rollback": rollback.strip().lower(), "by": args.by or _who()}
    elif args.forget:
        payload = {"forget": list(args.forget)}
    else:
        payload = {"hosts": list(args.host)}
    timeout = args.timeout if args.timeout is not None else (300.0 if rollback is not None else 10.0)
    try:
        status, body = asyncio.run(_post(url, token.reveal(), payload, timeout))
    except (OSError, TimeoutError) as err:
        print(f"reconciler sync: cannot reach the daemon at {url}: {type(err).__name__}", file=sys.stderr)
        return 1
    if status == 202:
        print(f"sync queued ({body.get('queued', '?')} host(s))")
        return 0
    if status == 200 and "forgotten" in body:
        print(f"forgotten: {', '.join(body['forgotten'])}")
        return 0
    if status == 200 and rollback is not None:
        commit, previous, head = body.get("commit", ""), body.get("previous", ""), body.get("head", "")
        print(f"rolled back to {commit[:12]} (was {previous[:12] or 'none'}), allowed by {body.get('by')}")
        if head and head != commit:
            print(f"note: the branch head {head[:12]} is ahead of it; its newer commits apply if they verify")
        return 0
    if status == 409 and rollback is not None:
        print(f"reconciler sync: rollback refused: {body.get('error', body)}", file=sys.stderr)
        return 1
    print(f"reconciler sync: the daemon answered {status}: {body.get('error', body)}", file=sys.stderr)
    return 1


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def _post(url: str, token: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    import aiohttp

    payload = json.dumps(body).encode() if any(body.values()) else b""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.post(url, data=payload, headers=headers) as resp,
        ):
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = {"error": "not a JSON answer"}
            return resp.status, data if isinstance(data, dict) else {"answer": data}
    except aiohttp.ClientError as err:
        raise OSError(str(err)) from None
