"""The reconcile loop: dedupe, one in flight per host, backoff, terminal errors, shutdown."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from reconciler.daemon.loop import ALL, ReconcileLoop
from reconciler.daemon.queue import Backoff, KeyedQueue
from reconciler.daemon.step import HostFailure, Outcome, Target
from reconciler.daemon.store import HostState, Store
from reconciler.errors import FleetInvalid, Problem, Reason, Terminal, Transient

HOSTS = ("db1", "db2", "web1", "web2", "web3")


class FakeSource:
    """A repo whose HEAD moves on each push; refresh reads HEAD like a real fetch would."""

    def __init__(self, hosts: tuple[str, ...] = HOSTS) -> None:
        self.head = 1
        self.hosts = hosts
        self.fetches = 0
        self.fetch_delay = 0.005

    def push(self) -> None:
        self.head += 1

    async def refresh(self) -> Target:
        self.fetches += 1
        await asyncio.sleep(self.fetch_delay)
        return Target(commit=f"c{self.head:03d}", fleet=None, hosts=self.hosts)


class Recorder:
    """A reconcile step that records concurrency and what it converged each host to."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.calls: dict[str, list[str]] = defaultdict(list)
        self.reasons: dict[str, list[frozenset[str]]] = defaultdict(list)
        self.applied: dict[str, str] = {}
        self.fail: dict[str, list[BaseException]] = defaultdict(list)
        self.call_times: dict[str, list[float]] = defaultdict(list)

    async def step(self, host: str, target: Target, reasons: frozenset[str]) -> Outcome:
        self.in_flight[host] += 1
        self.max_in_flight[host] = max(self.max_in_flight[host], self.in_flight[host])
        self.calls[host].append(target.commit)
        self.reasons[host].append(reasons)
        self.call_times[host].append(time.monotonic())
        try:
            await asyncio.sleep(self.delay)
            if self.fail[host]:
                raise self.fail[host].pop(0)
            self.applied[host] = target.commit
            return Outcome(reason="ok")
        finally:
            self.in_flight[host] -= 1


def make_loop(rec: Recorder, src: FakeSource, store: Store | None = None, **kw: object) -> ReconcileLoop:
    return ReconcileLoop(
        reconcile=rec.step,
        refresh=src.refresh,
        store=store,
        concurrency=kw.pop("concurrency", 4),  # type: ignore[arg-type]
        backoff=kw.pop("backoff", Backoff(base=0.05, maximum=0.2, rng=random.Random(1))),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    yield s  # type: ignore[misc]
    s.close()


async def test_keyed_queue_merges_and_keeps_one_follow_up() -> None:
    q = KeyedQueue("t")
    assert q.put("a", ["x"])
    assert not q.put("a", ["y"])  # merged into the queued entry
    item = await q.get()
    assert item == ("a", frozenset({"x", "y"}))
    for i in range(50):  # in flight: everything collapses into one follow-up
        q.put("a", [f"r{i}"])
    assert q.depth == 1
    q.done("a")
    again = await q.get()
    assert again is not None and again[0] == "a" and len(again[1]) == 50
    q.done("a")
    assert q.depth == 0


async def test_push_storm_converges_to_last_commit_one_in_flight_per_host(store: Store) -> None:
    src, rec = FakeSource(), Recorder(delay=0.03)
    loop = make_loop(rec, src, store)
    loop.start()
    max_depth = 0
    for _ in range(100):  # 100 pushes, each announced by a webhook-like fetch request
        src.push()
        loop.request_fetch(reason="webhook")
        max_depth = max(max_depth, loop.hosts.depth)
        await asyncio.sleep(0.001)
    await loop.wait_idle(timeout=20)
    await loop.stop(grace=1)

    last = f"c{src.head:03d}"
    assert all(rec.applied[h] == last for h in HOSTS), rec.applied
    assert max(rec.max_in_flight.values()) == 1
    assert max_depth <= len(HOSTS)  # at most one queued entry per host
    # Far fewer reconciles than pushes: dedupe collapsed the storm (timing decides the exact count).
    assert max(len(c) for c in rec.calls.values()) <= 50, {h: len(c) for h, c in rec.calls.items()}
    assert src.fetches <= 100
    for h in HOSTS:
        st = store.host(h)
        assert st.state is HostState.READY and st.applied_commit == last == st.attempted_commit


async def test_burst_of_100_events_is_one_fetch_and_one_reconcile_per_host(store: Store) -> None:
    src, rec = FakeSource(), Recorder(delay=0.01)
    loop = make_loop(rec, src, store)
    loop.start()
    await loop.wait_idle(timeout=10)
    fetches, calls = src.fetches, {h: len(rec.calls[h]) for h in HOSTS}
    for _ in range(100):  # 100 deliveries before the loop gets to run once
        src.push()
        loop.request_fetch(reason="webhook")
        loop.request(ALL, "webhook")
    await loop.wait_idle(timeout=10)
    await loop.stop(grace=1)
    assert src.fetches - fetches == 1
    assert all(len(rec.calls[h]) - calls[h] <= 2 for h in HOSTS)  # the old target, then the new one
    assert all(rec.applied[h] == f"c{src.head:03d}" for h in HOSTS)


async def test_transient_failure_backs_off_with_jitter_then_recovers(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    rec.fail["db1"] = [Transient("connection refused"), Transient("connection refused")]
    loop = make_loop(rec, src, store, backoff=Backoff(base=0.1, maximum=1.0, rng=random.Random(7)))
    loop.start()
    await asyncio.sleep(0.05)
    assert store.host("db1").state is HostState.RETRYING  # transient: not Stalled
    assert "connection refused" in store.host("db1").reason
    # Requests during the backoff do not bypass it.
    for _ in range(10):
        loop.request(ALL, "poll")
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    times = rec.call_times["db1"]
    assert len(times) == 3
    first_gap, second_gap = times[1] - times[0], times[2] - times[1]
    assert 0.05 <= first_gap < 0.3  # uniform in [0.05, 0.1] plus scheduling slack
    assert 0.1 <= second_gap < 0.5  # uniform in [0.1, 0.2]
    st = store.host("db1")
    assert st.state is HostState.READY and st.applied_commit == "c001"
    assert [e.kind for e in store.events(host="db1")].count("failed") == 2


async def test_backoff_delay_is_capped_and_jittered() -> None:
    b = Backoff(base=1, maximum=8, rng=random.Random(3))
    delays = [b.delay(n) for n in range(1, 10)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jitter, not a fixed value


async def test_terminal_error_waits_for_a_new_commit(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1", "web1")), Recorder(delay=0.0)
    rec.fail["db1"] = [Terminal("host key refused for db1")]
    loop = make_loop(rec, src, store)
    loop.start()
    await loop.wait_idle(timeout=5)
    assert store.host("db1").state is HostState.STALLED
    assert "waiting for a new commit" in store.host("db1").reason
    assert store.host("web1").state is HostState.READY  # one failed host never stops the others
    calls_before = len(rec.calls["db1"])
    for _ in range(5):  # polls and drift ticks on the same commit change nothing
        loop.request_fetch(reason="poll")
        loop.request(ALL, "drift")
        await asyncio.sleep(0.01)
    await loop.wait_idle(timeout=5)
    assert len(rec.calls["db1"]) == calls_before
    assert loop.host_info("db1")["waiting_for_new_commit"] is True
    src.push()  # a new commit: tried again
    loop.request_fetch(reason="webhook")
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert rec.calls["db1"][-1] == "c002"
    assert store.host("db1").state is HostState.READY


async def test_fleet_invalid_is_terminal() -> None:
    assert issubclass(FleetInvalid, Terminal)
    err = FleetInvalid([Problem("hosts/db1.yaml", 3, 1, "name", "bad")])
    assert "hosts/db1.yaml:3" in str(err)


async def test_explicit_resync_overrides_terminal_wait(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    rec.fail["db1"] = [Terminal("host key refused")]
    loop = make_loop(rec, src, store)
    loop.start()
    await loop.wait_idle(timeout=5)
    loop.request_fetch(then=(ALL,), force=True, reason="sighup")  # the admin fixed known_hosts
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert len(rec.calls["db1"]) == 2
    assert store.host("db1").state is HostState.READY


async def test_drift_timer_requests_every_host() -> None:
    src, rec = FakeSource(hosts=("db1", "db2")), Recorder(delay=0.0)
    loop = make_loop(rec, src, drift_interval=0.05)
    loop.start()
    await asyncio.sleep(0.2)
    await loop.stop(grace=1)
    for h in ("db1", "db2"):
        assert sum("drift" in r for r in rec.reasons[h]) >= 2


async def test_poll_timer_fetches_and_converges_new_commit() -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    loop = make_loop(rec, src, poll_interval=0.03)
    loop.start()
    await asyncio.sleep(0.05)
    src.push()  # no webhook: only the poll notices
    await asyncio.sleep(0.15)
    await loop.stop(grace=1)
    assert rec.applied["db1"] == "c002"


async def test_fetch_failure_backs_off_and_keeps_current_target() -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    real_refresh = src.refresh
    failures = {"n": 0}

    async def flaky() -> Target:
        if src.head > 1 and failures["n"] < 2:
            failures["n"] += 1
            raise Transient("git fetch: connection refused")
        return await real_refresh()

    loop = ReconcileLoop(
        reconcile=rec.step, refresh=flaky, concurrency=1, backoff=Backoff(base=0.02, maximum=0.05)
    )
    loop.start()
    await loop.wait_idle(timeout=5)
    src.push()
    loop.request_fetch(reason="webhook")
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert failures["n"] == 2
    assert rec.applied["db1"] == "c002"


async def test_stop_lets_in_flight_finish_within_grace(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.3)
    loop = make_loop(rec, src, store)
    loop.start()
    await asyncio.sleep(0.1)  # db1 is in flight now
    assert loop.hosts.in_flight == ("db1",)
    t0 = time.monotonic()
    await loop.stop(grace=5)
    assert time.monotonic() - t0 < 1.0
    assert store.host("db1").state is HostState.READY
    assert loop.request(ALL, "poll") == 0  # no new work after stop


async def test_stop_cancels_after_grace_and_marks_host(store: Store, tmp_path: Path) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=30)
    loop = make_loop(rec, src, store)
    loop.start()
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await loop.stop(grace=0.2)
    assert time.monotonic() - t0 < 1.0
    st = store.host("db1")
    assert st.state is HostState.RETRYING and "cancelled" in st.reason
    assert "db1" not in rec.applied


async def test_stop_drains_hosts_in_flight_then_stops(store: Store) -> None:
    """What the daemon's SIGTERM handler does (the signal itself goes to the real daemon process
    in tests/e2e/test_daemon.py, with an apply proven in flight): in-flight reconciles finish."""
    src, rec = FakeSource(hosts=("db1", "db2")), Recorder(delay=0.2)
    loop = make_loop(rec, src, store)
    loop.start()
    deadline = time.monotonic() + 5
    while not loop.hosts.in_flight:
        assert time.monotonic() < deadline, "no reconcile ever started"
        await asyncio.sleep(0.01)
    await asyncio.wait_for(loop.stop(grace=5), timeout=10)
    assert all(store.host(h).state is HostState.READY for h in ("db1", "db2"))


async def test_restart_resumes_interrupted_host(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s1 = Store(path)
    s1.mark_reconciling("db1", "c001")  # the process died here
    s1.close()
    s2 = Store(path)
    assert s2.interrupted_hosts == ("db1",)
    assert s2.host("db1").state is HostState.RETRYING
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    loop = make_loop(rec, src, s2)
    loop.start()
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert s2.host("db1").state is HostState.READY
    s2.close()


# ---------------------------------------------------------------- typed failures


async def test_terminal_failure_stalls_with_its_reason_and_reports_once(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1", "web1")), Recorder(delay=0.0)
    rec.fail["web1"] = [Terminal("apache2 died at reload; restored", reason=Reason.RELOAD_BROKE_SERVICE)]
    seen: list[HostFailure] = []
    loop = make_loop(rec, src, store, on_failure=seen.append)
    loop.start()
    await loop.wait_idle(timeout=5)
    for _ in range(5):  # polls and resyncs (not forced) on the same commit: nothing more
        loop.request_fetch(then=(ALL,), reason="poll")
        await asyncio.sleep(0.01)
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    st = store.host("web1")
    assert st.state is HostState.STALLED and st.code == "reload-broke-service"
    assert st.reason.startswith("reload-broke-service: apache2 died") and st.attempted_commit == "c001"
    assert len(rec.calls["web1"]) == 1
    assert loop.stalled_on("web1") is Reason.RELOAD_BROKE_SERVICE and loop.stalled_on("db1") is None
    assert [(f.host, f.commit, f.failure.reason, f.terminal) for f in seen] == [
        ("web1", "c001", Reason.RELOAD_BROKE_SERVICE, True)
    ]
    assert [e.kind for e in store.events(host="web1")] == ["stalled"]


async def test_transient_failure_reports_its_reason_and_the_retry(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    rec.fail["db1"] = [Transient("dpkg lock held by pid 9", reason=Reason.DPKG_LOCKED)]
    seen: list[HostFailure] = []
    loop = make_loop(rec, src, store, on_failure=seen.append)
    loop.start()
    await asyncio.sleep(0.02)
    st = store.host("db1")
    assert st.state is HostState.RETRYING and st.code == "dpkg-locked"
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert len(seen) == 1 and seen[0].failure.reason is Reason.DPKG_LOCKED and not seen[0].terminal
    assert seen[0].retry_in is not None and seen[0].retry_in > 0
    assert store.host("db1").state is HostState.READY  # retried after the backoff
    assert len(rec.calls["db1"]) == 2


async def test_a_stall_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s1 = Store(path)
    src, rec = FakeSource(hosts=("web1",)), Recorder(delay=0.0)
    rec.fail["web1"] = [Terminal("rolled back", reason=Reason.FIREWALL_ROLLED_BACK)]
    loop = make_loop(rec, src, s1)
    loop.start()
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    s1.close()
    # a new process on the same commit does not try it again (no second rollback)
    s2 = Store(path)
    rec2 = Recorder(delay=0.0)
    loop2 = make_loop(rec2, src, s2)
    loop2.start()
    await loop2.wait_idle(timeout=5)
    assert loop2.fetches >= 1 and rec2.calls["web1"] == []
    assert s2.host("web1").state is HostState.STALLED and loop2.host_info("web1")["waiting_for_new_commit"]
    src.push()  # a new commit clears it
    loop2.request_fetch(reason="webhook")
    await loop2.wait_idle(timeout=5)
    await loop2.stop(grace=1)
    assert rec2.calls["web1"] == ["c002"] and s2.host("web1").state is HostState.READY
    s2.close()


async def test_a_stalled_host_is_drift_scanned_never_applied(store: Store) -> None:
    src, rec = FakeSource(hosts=("web1",)), Recorder(delay=0.0)
    rec.fail["web1"] = [Terminal("validator refused", reason=Reason.VALIDATION_FAILED)]
    scans: list[str] = []

    async def scan(host: str, target: Target) -> int:
        scans.append(target.commit)
        return 2

    loop = make_loop(rec, src, store, scan=scan)
    loop.start()
    await loop.wait_idle(timeout=5)
    loop.request(ALL, "drift")
    loop.request(ALL, "poll")  # not a drift tick: refused
    await loop.wait_idle(timeout=5)
    assert scans == ["c001"] and len(rec.calls["web1"]) == 1
    st = store.host("web1")
    assert st.state is HostState.STALLED and st.drift_count == 2
    loop.request_fetch(then=(ALL,), force=True, reason="sync")  # reconciler sync: tried again
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert len(rec.calls["web1"]) == 2 and store.host("web1").state is HostState.READY


async def test_a_failing_report_callback_never_stops_the_loop(store: Store) -> None:
    src, rec = FakeSource(hosts=("db1",)), Recorder(delay=0.0)
    rec.fail["db1"] = [Terminal("refused")]

    def boom(_f: HostFailure) -> None:
        raise RuntimeError("mail is down")

    loop = make_loop(rec, src, store, on_failure=boom)
    loop.start()
    await loop.wait_idle(timeout=5)
    await loop.stop(grace=1)
    assert store.host("db1").state is HostState.STALLED
