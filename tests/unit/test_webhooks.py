"""Webhooks and the status endpoints over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from reconciler.daemon.config import Secret, ServerConfig
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.server import HttpServer

SECRET = "canary-webhook-secret-7f3a"
GITLAB = "canary-gitlab-token-91b2"
SYNC = "canary-sync-token-55c1"
BODY = json.dumps({"ref": "refs/heads/main", "after": "f" * 40, "repository": {"name": "fleet"}}).encode()


class FakeView:
    def __init__(self) -> None:
        self.hints: list[str] = []
        self.syncs: list[list[str]] = []
        self.is_ready = False
        self.hosts = ["db1", "web1"]

    def push_hint(self, provider: str) -> None:
        self.hints.append(provider)

    def sync(self, hosts: Sequence[str]) -> tuple[int, list[str]]:
        unknown = [h for h in hosts if h not in self.hosts]
        if not unknown:
            self.syncs.append(list(hosts))
        return (len(hosts) or len(self.hosts)), unknown

    def ready(self) -> bool:
        return self.is_ready

    def status(self) -> dict[str, Any]:
        return {
            "mode": "apply",
            "source": {"url": "file:///srv/fleet.git", "branch": "main", "head": "a" * 40, "good": "a" * 40},
            "queue": {"depth": 0},
            "hosts": [
                {
                    "name": "db1",
                    "state": "Ready",
                    "applied_commit": "a" * 40,
                    "attempted_commit": "a" * 40,
                    "reason": "no changes",
                    "last_drift_at": None,
                },
                {
                    "name": "web1",
                    "state": "Stalled",
                    "applied_commit": "",
                    "attempted_commit": "a" * 40,
                    "reason": "<script>alert(1)</script>",
                    "last_drift_at": time.time(),
                },
            ],  # fmt: skip
            "events": [
                {"at": time.time(), "kind": "drift", "host": "web1", "commit": "", "message": "<b>x</b>"}
            ],
            "mesh": {
                "hosts": [{"name": "db1", "site": ""}, {"name": "web1", "site": ""}],
                "links": [{"a": "db1", "b": "web1", "state": "down"}],
            },
        }

    async def host_page(self, name: str) -> dict[str, Any] | None:
        row = next((h for h in self.status()["hosts"] if h["name"] == name), None)
        if row is None:
            return None
        diff = "--- a/etc/motd\n+++ b/etc/motd\n+<script>alert(2)</script>\n"
        plan = {"summary": "applied 1 change(s)", "commit": "a" * 40, "applied": True,
                "actions": [{"kind": "change", "resource": "file /etc/motd", "reason": "content",
                             "diff": diff}],
                "pending": [], "skipped": [], "warnings": []}  # fmt: skip
        return {**row, "plan": plan, "plan_at": time.time(), "verify": None, "drift": [], "events": [],
                "last_mail": None, "applied_info": {"subject": "<i>subject</i>", "signer": "ops"},
                "attempted_info": {}}  # fmt: skip

    async def commits_page(self) -> dict[str, Any]:
        return {"running": [{"commit": "a" * 40, "subject": "fleet", "hosts": self.hosts}],
                "rejected": [{"commit": "b" * 40, "reason": "unsigned: <u>no</u>",
                              "at": time.time()}]}  # fmt: skip


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpServer, FakeView, str, aiohttp.ClientSession]]:
    view = FakeView()
    cfg = ServerConfig(
        listen="127.0.0.1",
        port=0,
        webhook_secret=Secret(SECRET),
        gitlab_token=Secret(GITLAB),
        sync_token=Secret(SYNC),
        max_body_bytes=64 * 1024,
    )
    server = HttpServer(cfg, view, DaemonMetrics())
    await server.start()
    session = aiohttp.ClientSession()
    try:
        yield server, view, f"http://127.0.0.1:{server.port}", session
    finally:
        await session.close()
        await server.stop()


def gh_sig(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    async with session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_github_valid_delivery_is_accepted_fast(served: Any) -> None:
    _, view, base, s = served
    t0 = time.monotonic()
    status, text = await post(
        s, f"{base}/hooks/github", BODY, {"X-Hub-Signature-256": gh_sig(BODY), "X-GitHub-Delivery": "d-1"}
    )
    assert status == 202, text
    assert time.monotonic() - t0 < 0.5
    assert view.hints == ["github"]


async def test_github_forged_tampered_missing_and_sha1_only(served: Any) -> None:
    _, view, base, s = served
    url = f"{base}/hooks/github"
    forged = {"X-Hub-Signature-256": gh_sig(BODY, "wrong-secret")}
    assert (await post(s, url, BODY, forged))[0] == 401
    tampered = BODY.replace(b"main", b"evil")
    assert (await post(s, url, tampered, {"X-Hub-Signature-256": gh_sig(BODY)}))[0] == 401
    assert (await post(s, url, BODY, {}))[0] == 401
    sha1 = "sha1=" + hmac.new(SECRET.encode(), BODY, hashlib.sha1).hexdigest()
    status, text = await post(s, url, BODY, {"X-Hub-Signature": sha1})
    assert status == 401 and "SHA-1" in text
    bare = {"X-Hub-Signature-256": gh_sig(BODY)[len("sha256=") :]}  # without the prefix
    assert (await post(s, url, BODY, bare))[0] == 401
    assert view.hints == []


async def test_gitea_signature(served: Any) -> None:
    _, view, base, s = served
    url = f"{base}/hooks/gitea"
    good = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert (await post(s, url, BODY, {"X-Gitea-Signature": good, "X-Gitea-Delivery": "g-1"}))[0] == 202
    assert (await post(s, url, BODY + b" ", {"X-Gitea-Signature": good}))[0] == 401
    assert (await post(s, url, BODY, {"X-Gitea-Signature": "0" * 64}))[0] == 401
    assert (await post(s, url, BODY, {}))[0] == 401
    assert view.hints == ["gitea"]


async def test_gitlab_token(served: Any) -> None:
    _, view, base, s = served
    url = f"{base}/hooks/gitlab"
    assert (await post(s, url, BODY, {"X-Gitlab-Token": GITLAB, "X-Gitlab-Event-UUID": "u-1"}))[0] == 202
    assert (await post(s, url, BODY, {"X-Gitlab-Token": SECRET}))[0] == 401
    assert (await post(s, url, BODY, {}))[0] == 401
    assert view.hints == ["gitlab"]


async def test_oversized_body_is_413(served: Any) -> None:
    _, view, base, s = served
    big = b"x" * (64 * 1024 + 1)
    status, _ = await post(s, f"{base}/hooks/github", big, {"X-Hub-Signature-256": gh_sig(big)})
    assert status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        for _ in range(100):
            yield b"y" * 4096

    async with s.post(
        f"{base}/hooks/github", data=chunks(), headers={"X-Hub-Signature-256": "sha256=00"}
    ) as r:
        assert r.status == 413
    assert view.hints == []


async def test_replayed_delivery_is_a_no_op(served: Any) -> None:
    _, view, base, s = served
    headers = {"X-Hub-Signature-256": gh_sig(BODY), "X-GitHub-Delivery": "replay-1"}
    assert (await post(s, f"{base}/hooks/github", BODY, headers))[0] == 202
    for _ in range(5):
        status, text = await post(s, f"{base}/hooks/github", BODY, headers)
        assert status == 200 and "duplicate" in text
    assert view.hints == ["github"]


async def test_unknown_provider_404(served: Any) -> None:
    _, _, base, s = served
    assert (await post(s, f"{base}/hooks/bitbucket", BODY, {}))[0] == 404


async def test_secrets_never_in_responses_or_status(served: Any) -> None:
    server, _, base, s = served
    pages = []
    for path in ("/status", "/", "/metrics", "/healthz", "/readyz"):
        async with s.get(base + path) as r:
            pages.append(await r.text())
    pages.append((await post(s, f"{base}/hooks/github", BODY, {"X-Hub-Signature-256": "sha256=0"}))[1])
    pages.append((await post(s, f"{base}/sync", b"", {"Authorization": "Bearer nope"}))[1])
    pages.append(repr(server.config))
    for text in pages:
        for secret in (SECRET, GITLAB, SYNC):
            assert secret not in text


async def test_health_ready_metrics_status_page(served: Any) -> None:
    server, view, base, s = served
    async with s.get(f"{base}/healthz") as r:
        assert r.status == 200
    async with s.get(f"{base}/readyz") as r:
        assert r.status == 503
    view.is_ready = True
    async with s.get(f"{base}/readyz") as r:
        assert r.status == 200
    await post(s, f"{base}/hooks/github", BODY, {"X-Hub-Signature-256": gh_sig(BODY)})
    server.metrics.reconcile_duration.observe(0.3, "ok")
    async with s.get(f"{base}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    assert 'reconciler_webhook_requests_total{provider="github",result="accepted"} 1.0' in text
    assert 'reconciler_reconcile_duration_seconds_bucket{le="0.5",result="ok"} 1.0' in text
    assert "# TYPE reconciler_hosts gauge" in text
    async with s.get(f"{base}/status") as r:
        data = await r.json()
    assert [h["name"] for h in data["hosts"]] == ["db1", "web1"]
    async with s.get(f"{base}/") as r:
        page = await r.text()
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "<b>x</b>" not in page and "Stalled" in page
    assert 'data-state="down"' in page and "<svg" in page
    async with s.get(f"{base}/hosts/web1") as r:
        host = await r.text()
        assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "<script>alert(2)</script>" not in host and "+&lt;script&gt;alert(2)" in host
    assert "<i>subject</i>" not in host and "signed by ops" in host
    for bad in ("/hosts/nosuch", "/hosts/..%2Fetc", "/hosts/%3Cscript%3E"):
        async with s.get(base + bad) as r:
            assert r.status == 404 and "<script>" not in await r.text()
    async with s.get(f"{base}/commits") as r:
        commits = await r.text()
    assert "<u>no</u>" not in commits and "unsigned: &lt;u&gt;no" in commits


async def test_sync_endpoint_needs_the_token(served: Any) -> None:
    _, view, base, s = served
    url = f"{base}/sync"
    assert (await post(s, url, b"", {}))[0] == 401
    assert (await post(s, url, b"", {"Authorization": "Bearer wrong"}))[0] == 401
    status, text = await post(s, url, b"", {"Authorization": f"Bearer {SYNC}"})
    assert status == 202 and view.syncs == [[]]
    body = json.dumps({"hosts": ["db1"]}).encode()
    assert (await post(s, url, body, {"Authorization": f"Bearer {SYNC}"}))[0] == 202
    body = json.dumps({"hosts": ["nope"]}).encode()
    status, text = await post(s, url, body, {"Authorization": f"Bearer {SYNC}"})
    assert status == 404 and "nope" in text
    assert (await post(s, url, b"{", {"Authorization": f"Bearer {SYNC}"}))[0] == 400
    assert view.syncs == [[], ["db1"]]


async def test_webhooks_disabled_without_secret() -> None:
    view = FakeView()
    server = HttpServer(ServerConfig(listen="127.0.0.1", port=0), view, DaemonMetrics())
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{server.port}"
            status, _ = await post(s, f"{base}/hooks/github", BODY, {"X-Hub-Signature-256": gh_sig(BODY, "")})
            assert status == 403
            assert (await post(s, f"{base}/sync", b"", {"Authorization": "Bearer "}))[0] == 403
    finally:
        await server.stop()
    assert view.hints == []
