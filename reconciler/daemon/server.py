"""HTTP: push webhooks (HMAC), ``POST /sync``, /healthz, /readyz, /metrics, /status and a page.

Webhooks are only a hint: a verified delivery queues a fetch of the fleet repo, nothing in the
payload is read or trusted. Each provider's authentication is checked over the RAW body with
``hmac.compare_digest``:

- ``POST /hooks/github``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`` (the SHA-1
  ``X-Hub-Signature`` alone is refused);
- ``POST /hooks/gitea``: ``X-Gitea-Signature: <hex HMAC-SHA256>``;
- ``POST /hooks/gitlab``: ``X-Gitlab-Token: <shared token>``.

A missing or wrong header is 401, a body over the limit 413; a good delivery is answered 202 at
once. A replayed delivery id (``X-GitHub-Delivery``, ``X-Gitea-Delivery``,
``X-Gitlab-Event-UUID``/``Idempotency-Key``) is a no-op (200). No secret is ever logged or shown.

Reading (``/status``, ``/`` and ``/metrics``) needs ``server.read_token`` as a bearer token or
as the password of HTTP Basic authentication (any user name; browsers ask for it on the page);
``/metrics`` also takes ``server.metrics_token`` (a scraper's token that cannot read /status).
Without a read token these are open only on a loopback address, or with ``server.public_status``
(``reconciler run`` refuses to start otherwise). ``/healthz`` and ``/readyz`` are always open;
webhooks authenticate with their HMAC only; ``POST /sync`` with the sync token. Every token is
compared in constant time.

``POST /sync`` with ``{"allow_rollback": "<commit>", "by": "<who>"}`` asks the daemon to move
its applied commit back to an older one that is still on the fetched branch and verifies
(see ``reconciler.daemon.source``); the answer waits for the outcome: 200 with the new commit, or 409
with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from aiohttp import web

from reconciler.daemon.config import Secret, ServerConfig
from reconciler.daemon.metrics import CONTENT_TYPE, DaemonMetrics
from reconciler.daemon.shard import FORWARDED_HEADER
from reconciler.daemon.statuspage import render_commits, render_host, render_overview
from reconciler.log import get_logger

log = get_logger(__name__)

DELIVERY_MEMORY = 4096
PROVIDERS = ("github", "gitea", "gitlab")
SHUTDOWN_TIMEOUT = 5.0  # seconds a request in flight may finish in when the daemon stops


# A request's headers (aiohttp's CIMultiDictProxy: lookups ignore case; tests pass a dict).
Headers: TypeAlias = Mapping[str, str]


class DaemonView(Protocol):
    """What the HTTP server needs from the daemon."""

    def push_hint(self, provider: str) -> None:
        """A verified push notification: fetch the fleet repo soon."""

    def sync(self, hosts: Sequence[str]) -> tuple[int, list[str]]:
        """Fetch, then resync ``hosts`` (all when empty); returns (queued, unknown host names)."""

    def forget(self, hosts: Sequence[str]) -> tuple[list[str], list[str]]:
        """Acknowledge hosts removed from the fleet; returns (forgotten, refused)."""

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    async def host_page(self, name: str) -> dict[str, Any] | None:
        """What the host page shows (None: no such host)."""
        ...

    async def commits_page(self) -> dict[str, Any]:
        """Which commit each host runs, refused commits."""
        ...

    async def rollback(self, commit: str, requested_by: str) -> tuple[bool, dict[str, Any]]:
        """Move the applied commit back to ``commit`` if allowed; (done, details or reason)."""
        ...


class ShardView(Protocol):
    """A sharded daemon (reconciler/daemon/shard.py): the whole fleet's status, webhooks sent on."""

    @property
    def sharded(self) -> bool: ...

    async def fleet_status(self) -> dict[str, Any]: ...

    def forward_hook(self, provider: str, headers: Headers, body: bytes) -> None: ...


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    reason: str = ""


def _hmac_hex(secret: Secret, body: bytes) -> str:
    return hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()


def check_github(headers: Headers, body: bytes, secret: Secret) -> AuthResult:
    sig = headers.get("X-Hub-Signature-256")
    if sig is None:
        if headers.get("X-Hub-Signature") is not None:
            return AuthResult(False, "SHA-1 X-Hub-Signature is not accepted; send X-Hub-Signature-256")
        return AuthResult(False, "missing X-Hub-Signature-256")
    expected = "sha256=" + _hmac_hex(secret, body)
    if not hmac.compare_digest(expected.encode(), sig.strip().encode("ascii", "replace")):
        return AuthResult(False, "signature does not match")
    return AuthResult(True)


def check_gitea(headers: Headers, body: bytes, secret: Secret) -> AuthResult:
    sig = headers.get("X-Gitea-Signature")
    if sig is None:
        return AuthResult(False, "missing X-Gitea-Signature")
    expected = _hmac_hex(secret, body)
    if not hmac.compare_digest(expected.encode(), sig.strip().lower().encode("ascii", "replace")):
        return AuthResult(False, "signature does not match")
    return AuthResult(True)


def check_gitlab(headers: Headers, body: bytes, token: Secret) -> AuthResult:
    given = headers.get("X-Gitlab-Token")
    if given is None:
        return AuthResult(False, "missing X-Gitlab-Token")
    if not hmac.compare_digest(token.reveal().encode(), given.encode("utf-8", "replace")):
        return AuthResult(False, "token does not match")
    return AuthResult(True)


_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def given_credential(headers: Headers) -> str:
    """The bearer token, or the password of HTTP Basic authentication ("" if neither)."""
    header = str(headers.get("Authorization", ""))
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


def token_matches(given: str, tokens: Sequence[Secret]) -> bool:
    """Constant time in the given value: every configured token is compared."""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token.reveal().encode(), given.encode("utf-8", "replace"))
    return bool(given) and ok


def delivery_id(provider: str, headers: Headers) -> str | None:
    names = {
        "github": ("X-GitHub-Delivery",),
        "gitea": ("X-Gitea-Delivery", "X-GitHub-Delivery"),
        "gitlab": ("X-Gitlab-Event-UUID", "Idempotency-Key", "X-Gitlab-Webhook-UUID"),
    }[provider]
    for name in names:
        value = headers.get(name)
        if value:
            return f"{provider}:{value.strip()[:200]}"
    return None


class _Deliveries:
    """Recently seen delivery ids (bounded)."""

    def __init__(self, size: int = DELIVERY_MEMORY) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._size = size

    def seen(self, key: str) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = time.time()
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False


class _TooLarge(Exception):
    pass


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    buf = bytearray()
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise _TooLarge
    return bytes(buf)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, sort_keys=True, default=str) + "\n",
        status=status,
        content_type="application/json",
    )


class HttpServer:
    def __init__(
        self, config: ServerConfig, view: DaemonView, metrics: DaemonMetrics, shard: ShardView | None = None
    ) -> None:
        self.shard = shard
        self.config = config
        self.view = view
        self.metrics = metrics
        self._deliveries = _Deliveries()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/hooks/{provider}", self.hook)
        app.router.add_post("/sync", self.sync)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/status", self.status)
        app.router.add_get("/", self.index)
        app.router.add_get("/hosts/{name}", self.host_page)
        app.router.add_get("/commits", self.commits_page)
        return app

    async def start(self) -> None:
        # On stop, a request still in its handler gets SHUTDOWN_TIMEOUT seconds (aiohttp's default,
        # 60 s, would hold a SIGTERM up past the loop's own grace).
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen, self.config.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.config.port
        log.info("http listening", address=self.config.listen, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ webhooks

    async def hook(self, request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        if provider not in PROVIDERS:
            raise web.HTTPNotFound(text="unknown webhook provider\n")
        try:
            body = await _read_body(request, self.config.max_body_bytes)
        except _TooLarge:
            self.metrics.webhooks.inc(1, provider, "too-large")
            return _json({"error": "body too large"}, status=413)
        secret = self.config.gitlab_token or self.config.webhook_secret
        if provider != "gitlab":
            secret = self.config.webhook_secret
        if not secret:
            self.metrics.webhooks.inc(1, provider, "disabled")
            return _json({"error": f"{provider} webhooks are not configured (no secret set)"}, status=403)
        if provider == "github":
            auth = check_github(request.headers, body, secret)
        elif provider == "gitea":
            auth = check_gitea(request.headers, body, secret)
        else:
            auth = check_gitlab(request.headers, body, secret)
        if not auth.ok:
            self.metrics.webhooks.inc(1, provider, "unauthorized")
            log.warning("webhook refused", provider=provider, reason=auth.reason, peer=request.remote)
            return _json({"error": auth.reason}, status=401)
        delivery = delivery_id(provider, request.headers)
        if delivery is not None and self._deliveries.seen(delivery):
            self.metrics.webhooks.inc(1, provider, "duplicate")
            return _json({"status": "duplicate delivery ignored"}, status=200)
        self.metrics.webhooks.inc(1, provider, "accepted")
        self.view.push_hint(provider)
        if self.shard is not None and self.shard.sharded and FORWARDED_HEADER not in request.headers:
            self.shard.forward_hook(provider, request.headers, body)  # the other replicas fetch too
        return _json({"status": "fetch queued"}, status=202)

    # ------------------------------------------------------------ sync

    async def sync(self, request: web.Request) -> web.Response:
        token = self.config.sync_token
        if not token:
            return _json({"error": "sync is disabled: set server.sync_token"}, status=403)
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(token.reveal().encode(), given.encode("utf-8", "replace")):
            return _json({"error": "missing or wrong bearer token"}, status=401)
        try:
            body = await _read_body(request, 65536)
        except _TooLarge:
            return _json({"error": "body too large"}, status=413)
        hosts: list[str] = []
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                return _json({"error": "body must be JSON"}, status=400)
            if isinstance(data, dict) and "allow_rollback" in data:
                return await self._rollback(request, data)
            raw = data.get("hosts", []) if isinstance(data, dict) else None
            if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
                return _json({"error": 'expected {"hosts": ["name", ...]}'}, status=400)
            hosts = raw
            forget = data.get("forget")
            if forget is not None:  # acknowledge hosts removed from the fleet (no sync)
                if not isinstance(forget, list) or not all(isinstance(h, str) for h in forget) or hosts:
                    return _json({"error": 'expected {"forget": ["name", ...]}'}, status=400)
                forgotten, refused = self.view.forget(forget)
                if refused:
                    return _json({"error": "not removed from the fleet", "refused": refused}, status=409)
                return _json({"status": "forgotten", "forgotten": forgotten}, status=200)
        queued, unknown = self.view.sync(hosts)
        if unknown:
            return _json({"error": "unknown hosts", "unknown": unknown}, status=404)
        return _json({"status": "sync queued", "hosts": hosts or "all", "queued": queued}, status=202)

    async def _rollback(self, request: web.Request, data: dict[str, Any]) -> web.Response:
        commit, by = data.get("allow_rollback"), data.get("by", "")
        if not isinstance(commit, str) or not _COMMIT.match(commit):
            return _json({"error": "allow_rollback: expected a commit id (7 to 64 hex digits)"}, status=400)
        if not isinstance(by, str):
            return _json({"error": "by: expected a string"}, status=400)
        who = _CONTROL.sub("?", by)[:200] or "unnamed"
        requested_by = f"{who} (from {request.remote or 'unknown address'})"
        log.warning("rollback requested", commit=commit, by=requested_by)
        done, details = await self.view.rollback(commit, requested_by)
        return _json(details if done else {"error": details.get("reason", "refused"), **details},
                     status=200 if done else 409)  # fmt: skip

    # ------------------------------------------------------------ visibility

    def _refuse_read(self, request: web.Request, *, metrics: bool = False) -> web.Response | None:
        """None when the request may read; else the 401/403 answer."""
        cfg = self.config
        tokens = [t for t in (cfg.read_token, cfg.metrics_token if metrics else None) if t]
        if not tokens:
            if cfg.loopback or cfg.public_status:
                return None
            return _json({"error": "reading is disabled: set server.read_token"}, status=403)
        if token_matches(given_credential(request.headers), tokens):
            return None
        response = _json({"error": "missing or wrong token"}, status=401)
        response.headers.add("WWW-Authenticate", 'Bearer realm="reconciler"')
        response.headers.add("WWW-Authenticate", 'Basic realm="reconciler", charset="UTF-8"')
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.view.ready():
            return web.Response(text="ready\n")
        return web.Response(text="not ready: the first fetch and load have not finished\n", status=503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        refused = self._refuse_read(request, metrics=True)
        if refused is not None:
            return refused
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def status(self, request: web.Request) -> web.Response:
        refused = self._refuse_read(request)
        if refused is not None:
            return refused
        if self.shard is not None and self.shard.sharded and request.query.get("scope") != "local":
            return _json(await self.shard.fleet_status())  # every replica's hosts, with their owner
        return _json(self.view.status())

    async def index(self, request: web.Request) -> web.Response:
        refused = self._refuse_read(request)
        if refused is not None:
            return refused
        sharded = self.shard is not None and self.shard.sharded
        status = await self.shard.fleet_status() if self.shard is not None and sharded else self.view.status()
        return _page(render_overview(status))

    async def host_page(self, request: web.Request) -> web.Response:
        refused = self._refuse_read(request)
        if refused is not None:
            return refused
        name = request.match_info["name"]
        host = await self.view.host_page(name) if _HOST_NAME.match(name) else None
        if host is None:
            return web.Response(text="no such host\n", status=404)
        return _page(render_host(self.view.status(), host))

    async def commits_page(self, request: web.Request) -> web.Response:
        refused = self._refuse_read(request)
        if refused is not None:
            return refused
        return _page(render_commits(self.view.status(), await self.view.commits_page()))


_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
CSP = "default-src 'none'; style-src 'unsafe-inline'"


def _page(text: str) -> web.Response:
    """An HTML page under the strict policy: no script, no external asset, inline styles only."""
    return web.Response(
        text=text,
        content_type="text/html",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
