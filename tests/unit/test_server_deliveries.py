"""Webhook delivery ids (daemon/server.py): a GitLab delivery replayed with the same
Idempotency-Key (or event UUID) is a no-op, and the memory of seen ids is bounded (an attacker
with a valid token cannot grow the daemon's memory without limit; an id forgotten long ago only
costs one extra fetch)."""

from __future__ import annotations

from typing import Any

from test_webhooks import BODY, GITLAB, post, served  # noqa: F401 (the fixture)

from reconciler.daemon import server as server_module


async def test_a_gitlab_replay_with_the_same_idempotency_key_is_a_no_op(served: Any) -> None:  # noqa: F811
    _, view, base, s = served
    url = f"{base}/hooks/gitlab"
    first = {"X-Gitlab-Token": GITLAB, "Idempotency-Key": "idem-7"}
    assert (await post(s, url, BODY, first))[0] == 202
    assert view.hints == ["gitlab"]  # positive evidence: the first delivery queued a fetch
    for _ in range(3):
        status, text = await post(s, url, BODY, first)
        assert status == 200 and "duplicate" in text, text
    assert (await post(s, url, BODY, {"X-Gitlab-Token": GITLAB, "Idempotency-Key": "idem-8"}))[0] == 202
    assert view.hints == ["gitlab", "gitlab"]


def test_the_delivery_memory_is_bounded_and_forgets_the_oldest() -> None:
    d = server_module._Deliveries(size=3)
    assert [d.seen(k) for k in ("a", "b", "c")] == [False, False, False]
    assert d.seen("a") is True  # remembered (and now the most recent)
    assert d.seen("d") is False  # over the bound: "b", the oldest, is forgotten
    assert len(d._seen) == 3
    assert d.seen("b") is False and d.seen("a") is True
    many = server_module._Deliveries()
    for i in range(server_module.DELIVERY_MEMORY * 3):
        many.seen(f"k{i}")
    assert len(many._seen) == server_module.DELIVERY_MEMORY
