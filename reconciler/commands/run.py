"""`reconciler run [--config FILE]` (the daemon) and `reconciler sync [--url URL] [--host H ...]`.

``sync`` asks a running daemon to fetch the fleet repo and reconcile every host (or the named
ones) now, through ``POST /sync`` with the bearer token ``server.sync_token``
(``RECONCILER_SERVER_SYNC_TOKEN`` or ``..._FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from reconciler import log as logsetup
from reconciler.config import ConfigError, load_config, require_runnable
from reconciler.errors import ReconcilerError


def register(sub: Any) -> None:
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
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
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
    from reconciler.daemon import run_daemon

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
    if args.forget and args.host:
        print("reconciler sync: --forget and --host do not go together", file=sys.stderr)
        return 1
    payload: dict[str, Any] = {"forget": list(args.forget)} if args.forget else {"hosts": list(args.host)}
    try:
        status, body = asyncio.run(_post(url, token.reveal(), payload, args.timeout))
    except (OSError, TimeoutError) as err:
        print(f"reconciler sync: cannot reach the daemon at {url}: {type(err).__name__}", file=sys.stderr)
        return 1
    if status == 202:
        print(f"sync queued ({body.get('queued', '?')} host(s))")
        return 0
    if status == 200 and "forgotten" in body:
        print(f"forgotten: {', '.join(body['forgotten'])}")
        return 0
    print(f"reconciler sync: the daemon answered {status}: {body.get('error', body)}", file=sys.stderr)
    return 1


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
