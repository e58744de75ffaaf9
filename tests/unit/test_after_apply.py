"""The daemon's verify-after-apply scheduling (reconciler.daemon.after_apply): hosts applied on one
commit are verified together once the push has settled, one batch at a time, and the ping
probe runs only when the apply could have changed the mesh. The verify run itself is replaced
by a recorder here (what it checks is tested in test_verify.py and on the lab)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from reconciler.daemon.after_apply import NO_PROBE_AFTER_APPLY, AfterApplyVerifier, needs_datapath_probe
from reconciler.kinds.resources import Domain
from reconciler.verify import VerifyOptions, VerifyReport
from reconciler.verify.checks import failed, passed, skipped


@dataclass(frozen=True)
class FakeTarget:
    commit: str
    fleet: Any = None


class Pools:
    def __init__(self) -> None:
        self.held = 0

    async def acquire(self, target: Any) -> Any:
        self.held += 1
        return object()

    async def release(self, target: Any) -> None:
        self.held -= 1


class Recorder:
    """Stands in for verify_fleet: records each batch; web2 fails its firewall check."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[list[str], VerifyOptions]] = []
        self.delay = delay

    async def __call__(
        self, fleet: Any, hosts: list[str], pool: Any, *, options: VerifyOptions
    ) -> VerifyReport:
        self.calls.append((list(hosts), options))
        await asyncio.sleep(self.delay)
        checks = []
        for h in hosts:
            checks.append(passed(h, "", "ipsec.daemon", "charon runs"))
            checks.append(skipped(h, "db1", "datapath", options.datapath_skip_reason) if not options.datapath
                          else passed(h, "db1", "datapath", "ESP seen"))  # fmt: skip
            if h == "web2":
                checks.append(failed(h, "db1", "firewall", "ESP from db1 dropped"))
        return VerifyReport.build(checks, hosts, [(h, "db1") for h in hosts], finished_at=1.0)


def make(
    busy: list[bool], recorder: Recorder, results: dict[str, Any], errors: list[str]
) -> tuple[AfterApplyVerifier, Pools]:  # noqa: E501
    pools = Pools()
    verifier = AfterApplyVerifier(
        pools,
        busy=lambda: busy[0],
        on_result=lambda host, r: results.__setitem__(host, r),
        on_error=errors.append,
        settle=0.05,
        max_wait=5.0,
        verify=recorder,
    )
    return verifier, pools


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_only_mesh_changes_need_the_ping_probe() -> None:
    assert not needs_datapath_probe([Domain.FILES])
    assert not needs_datapath_probe([Domain.FILES, Domain.APACHE, Domain.APPARMOR])
    for d in (Domain.FIREWALL, Domain.IPSEC, Domain.KEYS, Domain.TUNNELS, Domain.PACKAGES, Domain.SERVICES):
        assert needs_datapath_probe([Domain.FILES, d]), d


async def test_hosts_applied_on_one_commit_are_verified_in_one_batch_after_the_push_settles() -> None:
    busy = [True]
    rec = Recorder()
    results: dict[str, Any] = {}
    verifier, pools = make(busy, rec, results, [])
    target = FakeTarget("c1")
    for host in ("web1", "web2", "db1"):
        verifier.add(host, target, [Domain.FILES])
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert rec.calls == []  # other hosts are still reconciling: wait
    busy[0] = False
    await wait_for(lambda: len(results) == 3)
    assert [sorted(h) for h, _ in rec.calls] == [["db1", "web1", "web2"]]
    options = rec.calls[0][1]
    assert options.datapath is False and options.datapath_skip_reason == NO_PROBE_AFTER_APPLY
    assert results["web1"].ok and not results["web2"].ok
    assert results["web2"].failed[0]["cause"] == "ESP from db1 dropped"
    assert results["web1"].counts == {"pass": 1, "fail": 0, "skip": 1}
    assert results["db1"].batch_hosts == 3 and results["db1"].commit == "c1"
    assert results["db1"].as_json()["datapath_probe"] is False
    assert pools.held == 0
    await verifier.close()


async def test_a_mesh_change_runs_the_probe_and_later_hosts_form_the_next_batch() -> None:
    busy = [False]
    rec = Recorder(delay=0.3)
    results: dict[str, Any] = {}
    verifier, _ = make(busy, rec, results, [])
    verifier.add("web1", FakeTarget("c1"), [Domain.FILES])
    verifier.add("db1", FakeTarget("c1"), [Domain.FIREWALL])
    await wait_for(lambda: len(rec.calls) == 1)
    verifier.add("web2", FakeTarget("c2"), [Domain.APACHE])  # while the first batch runs
    await wait_for(lambda: len(rec.calls) == 2)
    await wait_for(lambda: "web2" in results)
    (first, opt1), (second, opt2) = rec.calls
    assert sorted(first) == ["db1", "web1"] and opt1.datapath is True
    assert second == ["web2"] and opt2.datapath is False
    assert results["web2"].commit == "c2" and results["web1"].datapath_probe is True
    await verifier.close()


async def test_a_steady_stream_of_reconciles_does_not_postpone_verify_forever() -> None:
    busy = [True]  # never idle
    rec = Recorder()
    results: dict[str, Any] = {}
    pools = Pools()
    verifier = AfterApplyVerifier(
        pools, busy=lambda: busy[0], on_result=lambda h, r: results.__setitem__(h, r),
        on_error=lambda h: None, settle=0.05, max_wait=0.3, verify=rec,
    )  # fmt: skip
    verifier.add("web1", FakeTarget("c1"), [Domain.FILES])
    await wait_for(lambda: "web1" in results, timeout=3)
    await verifier.close()


async def test_a_verify_that_cannot_run_is_reported_per_host_and_the_daemon_goes_on() -> None:
    async def broken(*args: Any, **kwargs: Any) -> VerifyReport:
        raise RuntimeError("boom")

    errors: list[str] = []
    pools = Pools()
    verifier = AfterApplyVerifier(
        pools, busy=lambda: False, on_result=lambda h, r: None, on_error=errors.append,
        settle=0.01, verify=broken,
    )  # fmt: skip
    verifier.add("web1", FakeTarget("c1"), [Domain.FILES])
    verifier.add("db1", FakeTarget("c1"), [Domain.FILES])
    await wait_for(lambda: len(errors) == 2)
    assert sorted(errors) == ["db1", "web1"] and pools.held == 0
    verifier.add("web2", FakeTarget("c2"), [Domain.FILES])  # the worker is still usable
    await wait_for(lambda: len(errors) == 3)
    await verifier.close()
