"""Three `reconciler run` replicas sharding one lab, as a StatefulSet would run them (no cluster).

Each replica gets what the StatefulSet gives a pod: its name (`reconciler-<k>`), N, and its peers'
URLs (here `http://127.0.0.1<k>:PORT`: three loopback addresses stand for the headless Service's
per-pod names). One module, one 6-host lab, tests in order, each from the state the previous left.
All three push their /etc history to one bare remote: one branch per host (history_branches: host).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from reconciler.daemon.shard import owner_of
from reconciler.lab import Lab, LabHostSpec
from tests.e2e.harness import clean_env, fleet_repo, git, spawn_daemon, webhook_headers

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(900)]

SECRET = "shard-webhook-canary-51e0"
READ = "shard-read-canary-0c3f"
HOSTS = [f"s{i}" for i in range(1, 7)]
NAMES = [f"reconciler-{k}" for k in range(3)]
FLEET = """apiVersion: reconciler/v1
kind: Fleet
name: sharded
id: sharded-e2e-0001
mesh: {internal_network: 10.99.0.0/24, topology: links, links: []}
firewall: {management_sources: [192.0.2.254/32], management_port: 22}
drift: {paths: [/etc/motd], interval_seconds: 3600, mode: enforce}
"""


def free_port() -> int:
    """A port free on the three loopback addresses the replicas listen on."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for k in range(3):
                with socket.socket() as t:
                    t.bind((f"127.0.0.1{k}", port))
            return port
        except OSError:
            continue
    raise AssertionError("no free port")


@dataclass
class World:
    tmp: Path
    lab: Lab
    work: Path
    remote: Path
    port: int
    history: Path  # the one /etc history remote of all replicas
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    def url(self, k: int) -> str:
        return f"http://127.0.0.1{k}:{self.port}"

    def start(self, k: int, replicas: int = 3) -> None:
        info = self.lab.info
        env = clean_env({
            "RECONCILER_SOURCE_URL": f"file://{self.remote}",
            "RECONCILER_SOURCE_POLL_INTERVAL": "10m",  # only webhooks (sent on by peers) bring pushes
            "RECONCILER_SERVER_LISTEN": f"127.0.0.1{k}",
            "RECONCILER_SERVER_PORT": str(self.port),
            "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
            "RECONCILER_SERVER_READ_TOKEN": READ,
            "RECONCILER_SSH_KNOWN_HOSTS": str(info.known_hosts),
            "RECONCILER_SSH_IDENTITY": str(info.client_key),
            "RECONCILER_STATE_DIR": str(self.tmp / f"state-{k}"),  # state, outbox, history per replica
            "RECONCILER_BACKOFF_BASE": "1s",
            "RECONCILER_BACKOFF_MAX": "3s",
            "RECONCILER_SHUTDOWN_GRACE": "10s",
            "RECONCILER_SHARD_REPLICAS": str(replicas),
            "RECONCILER_SHARD_NAME": NAMES[k],
            "RECONCILER_SHARD_PEER_URL": f"http://127.0.0.1{{ordinal}}:{self.port}",
            "RECONCILER_SHARD_PEER_TIMEOUT": "2s",
            "RECONCILER_HISTORY_REMOTE": f"file://{self.history}",  # one remote, a branch per host
        })  # fmt: skip
        log = self.tmp / f"replica-{k}-{len(self.logs)}.log"
        self.logs.append(log)
        self.procs[k] = spawn_daemon(env, log)

    def kill(self, k: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(k)
        p.send_signal(sig)
        p.wait(timeout=40)

    def push(self, text: str) -> str:
        (self.work / "templates/motd.j2").write_text(text + " on {{ host.name }}\n")
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", text)
        git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD")

    def tail(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in self.logs[-4:])


@pytest.fixture(scope="module")
def world(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("shard")
    repo = fleet_repo(tmp, source=None)  # unsigned pushes: these replicas verify no signature
    work, remote = repo.work, repo.remote
    for d in ("hosts", "roles", "files", "templates"):
        (work / d).mkdir(parents=True)
    (work / "fleet.yaml").write_text(FLEET)
    for i, h in enumerate(HOSTS, 1):
        (work / f"hosts/{h}.yaml").write_text(
            f"apiVersion: reconciler/v1\nkind: Host\nname: {h}\npublic_address: 192.0.2.{30 + i}\n"
            f"internal_address: 10.99.0.{30 + i}\nroles: [plain]\n"
        )
    (work / "roles/plain.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Role\nname: plain\nfiles: [motd]\n"
    )
    (work / "files/motd.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: ManagedFile\nname: motd\npath: /etc/motd\n"
        'template: templates/motd.j2\nmode: "0644"\nowner: root\ngroup: root\n'
    )
    lab = lab_factory(
        [LabHostSpec(h, f"192.0.2.{30 + i}") for i, h in enumerate(HOSTS, 1)], lock_timeout=1800
    )
    history = tmp / "etc-history.git"
    git(tmp, "init", "-q", "--bare", "-b", "main", str(history))
    git(history, "config", "receive.denyNonFastForwards", "true")  # a forced push would fail
    w = World(tmp, lab, work, remote, free_port(), history)
    w.push("version 1")
    try:
        yield w
    finally:
        for p in w.procs.values():
            p.kill()
            p.wait()
        lab.down()


async def status(w: World, k: int, scope: str = "") -> dict[str, Any]:
    q = f"?scope={scope}" if scope else ""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{w.url(k)}/status{q}", headers={"Authorization": f"Bearer {READ}"}) as r,
    ):
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def until(w: World, k: int, check: Any, what: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            st = await status(w, k)
            if check(st):
                return st
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: {json.dumps(st, indent=1)[:3000]}\n{w.tail()}")


def history_tips(w: World) -> dict[str, str]:
    """The history remote's branches: name -> commit."""
    out = git(w.history, "for-each-ref", "--format=%(refname) %(objectname)")
    return dict(line.split() for line in out.splitlines())


def history_until(w: World, check: Any, what: str, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        tips = history_tips(w)
        if check(tips):
            return tips
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {tips}\n{w.tail()}")
        time.sleep(0.2)


def mirrored(w: World, k: int, host: str) -> str | None:
    """The branch tip replica ``k`` last pushed for ``host`` (its bookkeeping ref), if any."""
    repo = w.tmp / f"state-{k}" / "history"
    args = ["git", f"--git-dir={repo}", "rev-parse", "-q", "--verify", f"refs/history-mirror/tip/{host}"]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def motd(w: World, host: str) -> str:
    return w.lab.exec(host, ["cat", "/etc/motd"]).stdout.decode()


def on(commit: str, hosts: list[str]) -> Any:
    def check(st: dict[str, Any]) -> bool:
        rows = {h["name"]: h for h in st["hosts"]}
        return all(
            rows.get(h, {}).get("state") == "Ready" and rows[h]["applied_commit"] == commit for h in hosts
        )

    return check


async def webhook(w: World, k: int) -> int:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    headers = {**webhook_headers(body, f"d-{time.time_ns()}", SECRET), "X-GitHub-Event": "push"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{w.url(k)}/hooks/github", data=body, headers=headers) as r,
    ):
        return r.status


def test_every_host_owned_by_exactly_one_replica(world: World) -> None:
    first = git(world.work, "rev-parse", "HEAD")
    for k in range(3):
        world.start(k)
    st = asyncio.run(until(world, 0, on(first, HOSTS), "first converge"))
    owners = {h["name"]: h["owner"] for h in st["hosts"]}
    assert owners == {h: owner_of(h, NAMES) for h in HOSTS}
    assert all(h["owner_reachable"] for h in st["hosts"])
    assert [p["name"] for p in st["shard"]["peers"]] == NAMES and all(
        p["reachable"] for p in st["shard"]["peers"]
    )
    # each replica's own view holds exactly its hosts: together every host, none twice
    locals_ = [asyncio.run(status(world, k, "local")) for k in range(3)]
    mine = [{h["name"] for h in loc["hosts"]} for loc in locals_]
    assert sorted(n for m in mine for n in m) == sorted(HOSTS)
    for k in range(3):
        assert mine[k] == {h for h in HOSTS if owners[h] == NAMES[k]}
        assert locals_[k]["shard"]["replica"] == NAMES[k]
    # any replica answers for the whole fleet
    assert {h["name"] for h in asyncio.run(status(world, 2))["hosts"]} == set(HOSTS)
    for h in HOSTS:
        assert motd(world, h) == f"version 1 on {h}\n"
    # the /etc history: one branch per fleet host on the one remote, never main, each holding
    # that host's snapshot only (its first scan ran before its first apply)
    wanted = {f"refs/heads/hosts/{h}" for h in HOSTS}
    tips = history_until(world, lambda t: set(t) == wanted, "one history branch per host")
    for h in HOSTS:
        tree = git(world.history, "ls-tree", "-r", "--name-only", tips[f"refs/heads/hosts/{h}"]).split()
        assert tree == [f"hosts/{h}/etc/motd", f"meta/{h}.json"], tree
        author = git(world.history, "log", "-1", "--format=%an", tips[f"refs/heads/hosts/{h}"])
        assert author.strip() == "reconciler"


def test_a_push_reaches_every_host_once(world: World) -> None:
    commit = world.push("version 2")
    assert asyncio.run(webhook(world, 0)) == 202  # to one replica only: it sends it on
    asyncio.run(until(world, 1, on(commit, HOSTS), "push via one replica's webhook", timeout=90))
    applied: dict[str, int] = {}
    for k in range(3):
        for e in asyncio.run(status(world, k, "local"))["events"]:
            if e.get("kind") == "applied" and e.get("commit") == commit:
                applied[e["host"]] = applied.get(e["host"], 0) + 1
    assert applied == dict.fromkeys(HOSTS, 1), applied
    for h in HOSTS:
        assert motd(world, h) == f"version 2 on {h}\n"


def test_a_killed_replica_shows_stale_then_picks_up_its_hosts(world: World) -> None:
    lost = [h for h in HOSTS if owner_of(h, NAMES) == NAMES[1]]
    kept = [h for h in HOSTS if h not in lost]
    assert lost and kept
    world.kill(1)
    commit = world.push("version 3")
    assert asyncio.run(webhook(world, 0)) == 202
    st = asyncio.run(until(world, 2, on(commit, kept), "survivors converge"))
    rows = {h["name"]: h for h in st["hosts"]}
    for h in lost:  # shown, not hidden: unknown, owner unreachable, the old commit on the host
        assert rows[h]["owner"] == NAMES[1] and rows[h]["owner_reachable"] is False
        assert rows[h]["state"] == "Unknown" and "did not answer" in rows[h]["reason"]
        assert motd(world, h) == f"version 2 on {h}\n"
    assert not next(p for p in st["shard"]["peers"] if p["name"] == NAMES[1])["reachable"]
    world.start(1)  # back (same name): it converges its own hosts
    asyncio.run(until(world, 0, on(commit, HOSTS), "returned replica picks up its hosts"))
    for h in lost:
        assert motd(world, h) == f"version 3 on {h}\n"


def test_n_changes_hosts_move_to_the_remaining_replicas(world: World) -> None:
    gone = [h for h in HOSTS if owner_of(h, NAMES) == NAMES[2]]
    before = history_tips(world)
    world.kill(2, signal.SIGTERM)  # scaled down: the highest ordinal goes
    commit = world.push("version 4")
    for k in (0, 1):  # the StatefulSet's new N reaches the remaining pods (a rolling restart)
        world.kill(k, signal.SIGTERM)
        world.start(k, replicas=2)
    st = asyncio.run(until(world, 0, on(commit, HOSTS), "two replicas own every host"))
    owners = {h["name"]: h["owner"] for h in st["hosts"]}
    assert set(owners.values()) <= set(NAMES[:2])
    # rendezvous hashing: only the hosts of the replica that went moved
    assert all(owners[h] == owner_of(h, NAMES) for h in HOSTS if h not in gone)
    for h in HOSTS:
        assert motd(world, h) == f"version 4 on {h}\n"
    # the moved hosts' history: their new owner (whose repo never saw them) snapshotted them at
    # start and continued their branches fast-forward from the gone replica's tips
    new_owner = {h: NAMES.index(owners[h]) for h in gone}
    deadline = time.monotonic() + 60
    while not all(mirrored(world, new_owner[h], h) for h in gone):
        assert time.monotonic() < deadline, f"moved hosts pushed by their new owner\n{world.tail()}"
        time.sleep(0.2)
    tips = history_tips(world)
    assert set(tips) == {f"refs/heads/hosts/{h}" for h in HOSTS}
    for h in gone:
        ref, pushed = f"refs/heads/hosts/{h}", mirrored(world, new_owner[h], h)
        assert pushed and pushed != before[ref]
        git(world.history, "merge-base", "--is-ancestor", before[ref], pushed)  # raises if not
        git(world.history, "merge-base", "--is-ancestor", pushed, tips[ref])
        assert git(world.history, "show", f"{pushed}:hosts/{h}/etc/motd")


def test_an_overlapping_apply_waits_for_the_host_lock(world: World) -> None:
    """Another apply (an old replica, a hand-run `reconciler apply`) holds the host's lock: the
    owner changes nothing while it is held (Retrying, host-locked), then converges."""
    host = HOSTS[0]
    k = NAMES.index(owner_of(host, NAMES[:2]))
    holder = subprocess.Popen(
        [*world.lab.nsenter_argv(host), "--", "sh", "-c",
         "mkdir -p -m 700 /run/reconciler && exec flock /run/reconciler/apply.lock sleep 15"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (
            "apply.lock"
            not in world.lab.exec(host, ["sh", "-c", "cat /proc/locks; ls /run/reconciler"]).stdout.decode()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        commit = world.push("version 5")
        assert asyncio.run(webhook(world, k)) == 202

        def locked(st: dict[str, Any]) -> bool:
            row = next(h for h in st["hosts"] if h["name"] == host)
            return bool(row["code"] == "host-locked")

        st = asyncio.run(until(world, k, locked, "owner sees the lock", timeout=60))
        assert holder.poll() is None  # still held while the owner was refused
        assert motd(world, host) == f"version 4 on {host}\n"
        row = next(h for h in st["hosts"] if h["name"] == host)
        assert row["state"] == "Retrying" and "another apply holds" in row["reason"]
    finally:
        holder.wait(timeout=30)
    asyncio.run(until(world, k, on(commit, [host]), "converges once the lock is free", timeout=60))
    assert motd(world, host) == f"version 5 on {host}\n"
