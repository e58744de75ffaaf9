"""Replicas talking over real HTTP on 127.0.0.1: a verified webhook sent on to the peers (who
check its signature themselves), the peers' status read with the read token and merged."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from reconciler.daemon.config import Secret, ServerConfig, ShardConfig
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.server import HttpServer
from reconciler.daemon.shard import Peer, PeerClient, Shard, merge_status, owner_of

SECRET = "peer-webhook-canary-2b7e"
READ = "peer-read-canary-90aa"
BODY = json.dumps({"ref": "refs/heads/main"}).encode()
HOSTS = [f"h{i}" for i in range(8)]


class Replica:
    """A FakeView-like daemon for one replica, with the shard touch points of Daemon."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.hints: list[str] = []
        self.peers = PeerClient(shard, Secret(READ))
        self.forwards: list[asyncio.Task[Any]] = []

    def push_hint(self, provider: str) -> None:
        self.hints.append(provider)

    def sync(self, hosts: Any) -> tuple[int, list[str]]:
        return 0, []

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        mine = [{"name": h, "state": "Ready", "applied_commit": "c1"} for h in self.shard.owned(HOSTS)]
        return {"hosts": mine, "source": {"good": "c1"}, "events": []}

    @property
    def sharded(self) -> bool:
        return True

    async def fleet_status(self) -> dict[str, Any]:
        return merge_status(self.shard, self.status(), await self.peers.statuses(), HOSTS)

    def forward_hook(self, provider: str, headers: Any, body: bytes) -> None:
        self.forwards.append(
            asyncio.get_running_loop().create_task(self.peers.forward_hook(provider, headers, body))
        )


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[list[Replica], list[str]]]:
    servers: list[HttpServer] = []
    for _ in range(3):  # ports first: each replica's peers need the others' URLs
        cfg = ServerConfig(listen="127.0.0.1", port=0, webhook_secret=Secret(SECRET), read_token=Secret(READ))
        s = HttpServer(cfg, None, DaemonMetrics())  # type: ignore[arg-type]
        await s.start()
        servers.append(s)
    ports = [s.port for s in servers]
    for s in servers:
        await s.stop()
    reps = []
    urls = []
    for k in range(3):
        shard = Shard.from_config(ShardConfig(3, f"reconciler-{k}", "http://127.0.0.1:PORT{ordinal}"))
        peers = tuple(Peer(p.name, f"http://127.0.0.1:{ports[int(p.name[-1])]}") for p in shard.peers)
        shard = Shard(shard.name, shard.replicas, peers, 2.0)
        rep = Replica(shard)
        cfg = ServerConfig(
            listen="127.0.0.1", port=ports[k], webhook_secret=Secret(SECRET), read_token=Secret(READ)
        )
        server = HttpServer(cfg, rep, DaemonMetrics(), shard=rep)
        await server.start()
        servers[k] = server
        reps.append(rep)
        urls.append(f"http://127.0.0.1:{ports[k]}")
    try:
        yield reps, urls
    finally:
        for r in reps:
            await asyncio.gather(*r.forwards, return_exceptions=True)
            await r.peers.close()
        for s in servers:
            await s.stop()


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d-1", "Content-Type": "application/json"}


async def test_a_verified_webhook_reaches_every_replica_once(
    replicas: tuple[list[Replica], list[str]],
) -> None:
    reps, urls = replicas
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{urls[1]}/hooks/github", data=BODY, headers=signed(BODY)) as r,
    ):
        assert r.status == 202
    await asyncio.gather(*reps[1].forwards)
    assert [r.hints for r in reps] == [["github"], ["github"], ["github"]]
    assert not reps[0].forwards and not reps[2].forwards  # a forwarded hook is not sent on again


async def test_a_forged_webhook_goes_nowhere(replicas: tuple[list[Replica], list[str]]) -> None:
    reps, urls = replicas
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{urls[0]}/hooks/github", data=BODY, headers=signed(BODY, "wrong")) as r:
            assert r.status == 401
        # "forwarded" by an attacker straight to a peer: the peer checks the signature itself
        headers = {**signed(BODY, "wrong"), "X-Reconciler-Forwarded": "reconciler-0"}
        async with s.post(f"{urls[2]}/hooks/github", data=BODY, headers=headers) as r:
            assert r.status == 401
    assert [r.hints for r in reps] == [[], [], []] and not any(r.forwards for r in reps)


async def test_any_replica_shows_the_whole_fleet(replicas: tuple[list[Replica], list[str]]) -> None:
    reps, urls = replicas
    auth = {"Authorization": f"Bearer {READ}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{urls[2]}/status", headers=auth) as r:
            fleet = await r.json()
        async with s.get(f"{urls[2]}/status?scope=local", headers=auth) as r:
            local = await r.json()
        async with s.get(f"{urls[2]}/status") as r:
            assert r.status == 401
    names = [f"reconciler-{k}" for k in range(3)]
    assert [h["name"] for h in fleet["hosts"]] == HOSTS
    assert all(h["owner"] == owner_of(h["name"], names) and h["owner_reachable"] for h in fleet["hosts"])
    assert {h["name"] for h in local["hosts"]} == {h for h in HOSTS if owner_of(h, names) == "reconciler-2"}
