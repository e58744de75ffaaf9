"""The status page (GET /) over real HTTP: text a pusher controls (the reason a commit was
refused quotes the commit's own content; host reasons, event messages) is shown escaped, never
as markup. Written against the page's behaviour, not its template code."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from test_webhooks import SECRET, FakeView

from reconciler.daemon.config import Secret, ServerConfig
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.server import HttpServer

ATTACK = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


class RefusedView(FakeView):
    def status(self) -> dict[str, Any]:
        status = super().status()
        status["source"]["rejection"] = {
            "commit": "b" * 40,
            "kind": "invalid",
            "reason": f"hosts/web1.yaml:3:7: name: {ATTACK} is not a valid host name",
            "at": time.time(),
        }
        status["hosts"][1]["reason"] = f"apply failed: {ATTACK}"
        status["events"][0]["message"] = f"drift: {ATTACK}"
        return status

    async def commits_page(self) -> dict[str, Any]:
        page = await super().commits_page()
        page["rejected"][0]["reason"] = f"invalid: name: {ATTACK} is not a valid host name"
        return page


async def test_the_refused_commit_reason_is_escaped_on_the_status_page() -> None:
    cfg = ServerConfig(listen="127.0.0.1", port=0, webhook_secret=Secret(SECRET))
    server = HttpServer(cfg, RefusedView(), DaemonMetrics())
    await server.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.port}/") as r:
            assert r.status == 200
            page = await r.text()
    finally:
        await server.stop()
    assert "is not a valid host name" in page and "b" * 12 in page  # the refusal is shown...
    assert f"name: {ESCAPED} is not a valid host name" in page  # ...with its reason escaped
    assert page.count(ESCAPED) == 3, page  # and the host reason and the event message too
    assert "<img" not in page.lower()


async def test_reasons_are_escaped_on_the_commits_and_host_pages() -> None:
    cfg = ServerConfig(listen="127.0.0.1", port=0, webhook_secret=Secret(SECRET))
    server = HttpServer(cfg, RefusedView(), DaemonMetrics())
    await server.start()
    pages = {}
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/commits", "/hosts/web1"):
                async with s.get(f"http://127.0.0.1:{server.port}{path}") as r:
                    assert r.status == 200
                    pages[path] = await r.text()
    finally:
        await server.stop()
    assert f"name: {ESCAPED} is not a valid host name" in pages["/commits"]
    assert f"apply failed: {ESCAPED}" in pages["/hosts/web1"]
    assert all("<img" not in page.lower() for page in pages.values()), pages
