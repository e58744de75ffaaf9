"""Reading the daemon (/status, /, /metrics) behind a token, over real HTTP on 127.0.0.1; and the
rollback request of POST /sync."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_webhooks import BODY, SECRET, SYNC, FakeView, gh_sig, post

from reconciler.daemon.config import Secret, ServerConfig
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.server import HttpServer, given_credential, token_matches

READ = "canary-read-token-19af"
METRICS = "canary-metrics-token-c07e"
READ_PATHS = ("/status", "/", "/metrics")


class RollbackView(FakeView):
    def __init__(self) -> None:
        super().__init__()
        self.rollbacks: list[tuple[str, str]] = []

    async def rollback(self, commit: str, requested_by: str) -> tuple[bool, dict[str, Any]]:
        self.rollbacks.append((commit, requested_by))
        if commit.startswith("bad"):
            return False, {"reason": "commit bad is not on branch main"}
        return True, {"status": "rolled back", "commit": commit, "by": requested_by}


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[HttpServer] = []
    session = aiohttp.ClientSession()

    async def start(**settings: Any) -> tuple[HttpServer, str]:
        cfg = ServerConfig(listen="127.0.0.1", port=0, webhook_secret=Secret(SECRET), sync_token=Secret(SYNC))
        server = HttpServer(dataclasses.replace(cfg, **settings), RollbackView(), DaemonMetrics())
        await server.start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.port}"

    try:
        yield start, session
    finally:
        await session.close()
        for server in servers:
            await server.stop()


async def get(s: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.get(url, headers=headers or {}) as r:
        return r.status, r.headers


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_loopback_without_a_token_stays_open(serve: Any) -> None:
    start, s = serve
    _, base = await start()
    for path in READ_PATHS:
        assert (await get(s, base + path))[0] == 200


async def test_a_read_token_is_required_once_set(serve: Any) -> None:
    start, s = serve
    _, base = await start(read_token=Secret(READ), metrics_token=Secret(METRICS))
    for path in READ_PATHS:
        status, headers = await get(s, base + path)
        assert status == 401, path
        challenges = headers.getall("WWW-Authenticate")
        assert any(c.startswith("Bearer") for c in challenges) and any(
            c.startswith("Basic") for c in challenges
        )
        assert (await get(s, base + path, {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await get(s, base + path, {"Authorization": f"Bearer {READ}x"}))[0] == 401
        assert (await get(s, base + path, {"Authorization": f"Bearer {READ}"}))[0] == 200
        assert (await get(s, base + path, basic("anyone", READ)))[0] == 200  # a browser on the page
    # the metrics token reads /metrics only
    assert (await get(s, base + "/metrics", {"Authorization": f"Bearer {METRICS}"}))[0] == 200
    assert (await get(s, base + "/status", {"Authorization": f"Bearer {METRICS}"}))[0] == 401
    assert (await get(s, base + "/", basic("x", METRICS)))[0] == 401
    # health, readiness and webhooks do not take the read token
    assert (await get(s, base + "/healthz"))[0] == 200
    assert (await get(s, base + "/readyz"))[0] == 503  # not ready, but answered
    assert (await post(s, base + "/hooks/github", BODY, {"X-Hub-Signature-256": gh_sig(BODY)}))[0] == 202
    assert (await post(s, base + "/hooks/github", BODY, {"Authorization": f"Bearer {READ}"}))[0] == 401
    assert (await post(s, base + "/sync", b"", {"Authorization": f"Bearer {READ}"}))[0] == 401


async def test_beyond_loopback_reading_needs_a_token_or_public_status(serve: Any) -> None:
    """The policy follows the configured address (the server here listens on 127.0.0.1 and is
    told it listens on 0.0.0.0; `reconciler run` refuses to start that way at all)."""
    start, s = serve
    server, base = await start()
    server.config = dataclasses.replace(server.config, listen="0.0.0.0")  # noqa: S104
    for path in READ_PATHS:
        status, _ = await get(s, base + path)
        assert status == 403, path
    server.config = dataclasses.replace(server.config, public_status=True)
    for path in READ_PATHS:
        assert (await get(s, base + path))[0] == 200
    server.config = dataclasses.replace(server.config, public_status=False, read_token=Secret(READ))
    assert (await get(s, base + "/status"))[0] == 401
    assert (await get(s, base + "/status", {"Authorization": f"Bearer {READ}"}))[0] == 200


async def test_tokens_never_appear_in_answers(serve: Any) -> None:
    start, s = serve
    _, base = await start(read_token=Secret(READ), metrics_token=Secret(METRICS))
    for path in (*READ_PATHS, "/healthz"):
        async with s.get(base + path, headers={"Authorization": f"Bearer {READ}"}) as r:
            text = await r.text()
        assert READ not in text and METRICS not in text


def test_credentials_and_comparison() -> None:
    assert given_credential({"Authorization": "Bearer abc "}) == "abc"
    assert given_credential({"Authorization": "bearer abc"}) == "abc"
    assert given_credential(basic("u", "p:w")) == "p:w"
    assert given_credential({"Authorization": "Basic !!!"}) == ""
    assert given_credential({"Authorization": "Token abc"}) == ""
    assert given_credential({}) == ""
    tokens = [Secret("one"), Secret("two")]
    assert token_matches("two", tokens) and token_matches("one", tokens)
    assert not token_matches("", [Secret("")]) and not token_matches("on", tokens)


async def test_rollback_request_over_sync(serve: Any) -> None:
    start, s = serve
    server, base = await start()
    view = server.view
    auth = {"Authorization": f"Bearer {SYNC}"}
    for bad in ({"allow_rollback": "HEAD~1"}, {"allow_rollback": "abc"}, {"allow_rollback": 5},
                {"allow_rollback": "a" * 12, "by": 3}):  # fmt: skip
        assert (await post(s, base + "/sync", json.dumps(bad).encode(), auth))[0] == 400
    body = json.dumps({"allow_rollback": "a" * 12}).encode()
    assert (await post(s, base + "/sync", body, {}))[0] == 401
    status, text = await post(
        s, base + "/sync", json.dumps({"allow_rollback": "a" * 12, "by": "alice\n"}).encode(), auth
    )
    assert status == 200 and json.loads(text)["status"] == "rolled back"
    status, text = await post(
        s, base + "/sync", json.dumps({"allow_rollback": "bad" + "0" * 9}).encode(), auth
    )
    assert status == 409 and "not on branch main" in json.loads(text)["error"]
    assert view.rollbacks[0] == ("a" * 12, "alice? (from 127.0.0.1)")
