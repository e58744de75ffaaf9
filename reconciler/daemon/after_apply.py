"""Verify after apply, in batches: the daemon proves applied hosts live without slowing a push.

Verifying one host reads facts from each of its mesh peers (both sides of every pair are
checked), so verifying each host on its own as its apply ends costs N round trips per host and
N^2 for a fleet-wide push. Instead, hosts applied on the same commit are collected and verified
together by one ``verify_fleet`` run (every host read once) when the push has settled: no host
reconcile queued or in flight, and no new applied host for ``settle`` seconds (or after
``max_wait`` at the latest). One batch runs at a time; hosts applied meanwhile form the next.

The ping + capture probe (each selected host pings every peer while capturing on its public
interface) runs only when a batch applied something that can change the mesh: firewall, IPsec,
key pairs, tunnels, addresses, packages or services. A change to managed files, Apache or
AppArmor alone is proven by the other checks (firewall, SAs, sites, profiles); the report then
shows the datapath check as skipped, with that reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler import usecases
from reconciler.daemon.step import Target
from reconciler.host.connection import ConnectionPool
from reconciler.kinds.resources import Domain
from reconciler.log import get_logger
from reconciler.verify import VerifyOptions, VerifyReport

log = get_logger(__name__)

# Domains whose changes cannot alter the mesh's datapath (what the ping + capture probe proves).
NO_DATAPATH_DOMAINS = frozenset({Domain.FILES, Domain.APACHE, Domain.APPARMOR})
NO_PROBE_AFTER_APPLY = (
    "not run after this apply: it changed only managed files, Apache or AppArmor, which cannot "
    "change the mesh datapath (`reconciler verify` runs the probe)"
)


def needs_datapath_probe(domains: Iterable[Domain]) -> bool:
    """Whether an apply that changed these domains should be proven with the ping probe."""
    return any(d not in NO_DATAPATH_DOMAINS for d in domains)


class Pools(Protocol):
    async def acquire(self, target: Target) -> ConnectionPool: ...

    async def release(self, target: Target) -> None: ...


@dataclass
class _Batch:
    target: Target
    hosts: set[str] = field(default_factory=set)
    datapath: bool = False
    last_added: float = 0.0
    first_added: float = 0.0


@dataclass(frozen=True)
class HostVerify:
    """The last verify-after-apply of one host, as /status shows it."""

    ok: bool
    commit: str
    finished_at: float
    counts: dict[str, int]
    failed: list[dict[str, Any]]
    datapath_probe: bool
    batch_hosts: int
    seconds: float
    # every check, short (name, peer, status, cause): the status page's per-link colours
    checks: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "commit": self.commit,
            "finished_at": self.finished_at,
            "counts": self.counts,
            "failed": self.failed,
            "datapath_probe": self.datapath_probe,
            "batch_hosts": self.batch_hosts,
            "seconds": round(self.seconds, 3),
            "checks": list(self.checks),
        }


MAX_CHECKS_SHOWN = 400

Listener = Callable[[str, HostVerify], None]
VerifyFn = Callable[..., Awaitable[VerifyReport]]  # usecases.verify's signature
ErrorListener = Callable[[str], None]


class AfterApplyVerifier:
    """Collects applied hosts and verifies them in batches (see the module doc)."""

    def __init__(
        self,
        pools: Pools,
        *,
        busy: Callable[[], bool],
        on_result: Listener,
        on_error: ErrorListener,
        settle: float = 0.5,
        max_wait: float = 30.0,
        host_timeout: float = 60.0,
        verify: VerifyFn = usecases.verify,
    ) -> None:
        self._verify = verify
        self._pools = pools
        self._busy = busy
        self._on_result = on_result
        self._on_error = on_error
        self._settle = settle
        self._max_wait = max_wait
        self._host_timeout = host_timeout
        self._pending: dict[str, _Batch] = {}  # commit -> batch not yet started
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.results: dict[str, HostVerify] = {}

    def add(self, host: str, target: Target, domains: Iterable[Domain]) -> None:
        """``host`` was applied on ``target`` (changing ``domains``): verify it soon."""
        now = time.monotonic()
        batch = self._pending.get(target.commit)
        if batch is None:
            batch = self._pending[target.commit] = _Batch(target, first_added=now)
        batch.hosts.add(host)
        batch.datapath = batch.datapath or needs_datapath_probe(domains)
        batch.last_added = now
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="verify-after-apply")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _ready(self, batch: _Batch, now: float) -> bool:
        if now - batch.first_added >= self._max_wait:
            return True
        return now - batch.last_added >= self._settle and not self._busy()

    async def _worker(self) -> None:
        while self._pending:
            now = time.monotonic()
            due = [c for c, b in self._pending.items() if self._ready(b, now)]
            if not due:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(self._settle, 0.1) or 0.05)
                except TimeoutError:
                    pass
                continue
            batch = self._pending.pop(due[0])
            await self._run(batch)

    async def _run(self, batch: _Batch) -> None:
        hosts = sorted(batch.hosts)
        options = VerifyOptions(
            datapath=batch.datapath,
            datapath_skip_reason=NO_PROBE_AFTER_APPLY,
            host_timeout=self._host_timeout,
        )
        started = time.monotonic()
        pool = await self._pools.acquire(batch.target)
        try:
            report = await self._verify(batch.target.fleet, hosts, pool, options=options)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # verification problems never stop the daemon
            log.warning("verify after apply failed to run", hosts=len(hosts), error=type(exc).__name__)
            for host in hosts:
                self._on_error(host)
            return
        finally:
            await self._pools.release(batch.target)
        seconds = time.monotonic() - started
        log.info("verified after apply", hosts=len(hosts), ok=report.ok, datapath=batch.datapath,
                 seconds=round(seconds, 3))  # fmt: skip
        for host in hosts:
            checks = report.for_host(host)
            counts = {"pass": 0, "fail": 0, "skip": 0}
            for c in checks:
                counts[c.status.value] = counts.get(c.status.value, 0) + 1
            failed = [c.as_dict() for c in checks if c.status.value == "fail"]
            result = HostVerify(
                ok=not failed,
                commit=batch.target.commit,
                finished_at=report.finished_at,
                counts=counts,
                failed=failed[:20],
                datapath_probe=batch.datapath,
                batch_hosts=len(hosts),
                seconds=seconds,
                checks=tuple(
                    {"name": c.name, "peer": c.peer, "status": c.status.value, "cause": c.cause[:300]}
                    for c in checks[:MAX_CHECKS_SHOWN]
                ),
            )
            self.results[host] = result
            self._on_result(host, result)
