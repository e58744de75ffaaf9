"""Event sources -> one deduplicating per-host queue -> workers.

Reconciliation is level-triggered: an event (poll tick, webhook, drift timer, SIGHUP,
``reconciler sync``) only says "look at host X (or every host) again". A worker then reconciles
that host against the newest good target (commit + loaded fleet) and the host's live state.

Guarantees, whatever the event rate:
- at most one reconcile in flight per host, and at most one queued follow-up per host (events
  that arrive while a host is queued or in flight merge into that one entry);
- the fleet repo is fetched by one worker with the same dedupe (one fetch in flight, at most
  one follow-up), so a storm of pushes converges to the last commit;
- a transient failure (``reconciler.errors.Transient``, or anything not Terminal) retries with
  exponential backoff and jitter, the host ``Retrying`` with the reason; a terminal failure
  (``reconciler.errors.Terminal``: a firewall change rolled back, a config that broke its service,
  a validator that refused...) makes the host ``Stalled`` on that commit with the typed reason:
  nothing more is tried until a new commit or an explicit resync (``reconciler sync``, SIGHUP).
  The stall is kept in the store, so a restart does not try the commit again; a drift tick still
  runs the drift scan (``scan``) on a stalled host, never the apply;
- ``stop(grace)``: take no new work, let in-flight reconciles finish for up to ``grace``
  seconds, then cancel them (cancellation behaves like a crash, which apply tolerates; the host
  is marked Retrying and reconciled again after a restart).

The reconcile step and the source refresh are injected, so this module knows nothing about
git, SSH or the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from reconciler.daemon.host_record import HostRecord
from reconciler.daemon.queue import Backoff, KeyedQueue
from reconciler.daemon.step import (
    HostFailure,
    Outcome,
    ReconcileStep,
    RefreshStep,
    ScanStep,
    Target,
    user_message,
)
from reconciler.daemon.store import Store
from reconciler.errors import Failure, Reason, ReconcilerError, Terminal
from reconciler.log import get_logger

log = get_logger(__name__)

ALL = "*"
SOURCE_KEY = ":source"  # not a valid host name


class ReconcileLoop:
    """Owns the queues, workers, timers and per-host retry state."""

    def __init__(
        self,
        *,
        reconcile: ReconcileStep,
        refresh: RefreshStep,
        store: Store | None = None,
        concurrency: int = 10,
        poll_interval: float = 0.0,
        drift_interval: float | Callable[[], float] = 0.0,
        backoff: Backoff | None = None,
        on_result: Callable[[str, str, float], None] | None = None,
        on_converged: Callable[[str, float], None] | None = None,
        on_failure: Callable[[HostFailure], None] | None = None,
        scan: ScanStep | None = None,
    ) -> None:
        self._reconcile = reconcile
        self._refresh = refresh
        self._store = store
        self._concurrency = max(1, concurrency)
        self._poll_interval = poll_interval
        self._drift_interval = drift_interval if callable(drift_interval) else (lambda: drift_interval)
        self._backoff = backoff or Backoff()
        self._on_result = on_result
        self._on_converged = on_converged
        self._on_failure = on_failure
        self._scan = scan
        self.hosts = KeyedQueue("hosts")
        self.source = KeyedQueue("source")
        self._records: dict[str, HostRecord] = {}
        self._target: Target | None = None
        self._target_seen_at = 0.0
        self._target_converged = False
        self._after_fetch: set[str] = set()
        self._after_fetch_force = False
        self._source_failures = 0
        self._source_retry: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []  # workers
        self._timers: list[asyncio.Task[None]] = []  # poll and drift tickers
        self._stopping = False
        self.first_refresh_done = asyncio.Event()
        self.fetches = 0

    # ------------------------------------------------------------ state for /status

    @property
    def target(self) -> Target | None:
        return self._target

    @property
    def stopping(self) -> bool:
        return self._stopping

    def host_info(self, host: str) -> dict[str, Any]:
        rec = self._records.get(host)
        if rec is None:
            return {"failures": 0, "waiting_for_new_commit": False, "retry_scheduled": False}
        return {
            "failures": rec.failures,
            "waiting_for_new_commit": self.stalled_on(host) is not None,
            "retry_scheduled": rec.retry is not None,
        }

    def stalled_on(self, host: str) -> Reason | None:
        """The terminal reason ``host`` is stalled for on the current target, or None."""
        rec = self._records.get(host)
        if rec is None or self._target is None or rec.terminal_commit != self._target.commit:
            return None
        return rec.terminal_reason

    def _record(self, host: str) -> HostRecord:
        """The host's retry state; a new one starts from the store's (a stall survives a restart)."""
        rec = self._records.get(host)
        if rec is None:
            rec = self._records[host] = HostRecord.restored(host, self._store)
        return rec

    def seed(self, target: Target) -> None:
        """The last good target from the previous run, used until the first fetch succeeds."""
        if self._target is None:
            self._target = target
            self._target_seen_at = time.monotonic()

    # ------------------------------------------------------------ events in

    def request_fetch(self, *, then: Iterable[str] = (), force: bool = False, reason: str = "fetch") -> None:
        """Fetch the fleet repo; afterwards reconcile hosts whose target changed, plus ``then``."""
        if self._stopping:
            return
        self._after_fetch.update(then)
        self._after_fetch_force = self._after_fetch_force or force
        self.source.put(SOURCE_KEY, [reason])

    def request(self, hosts: Iterable[str] | str, reason: str, *, force: bool = False) -> int:
        """Ask to look at ``hosts`` (or ``ALL``) again. Returns how many were newly queued."""
        if self._stopping or self._target is None:
            return 0
        names = self._target.hosts if hosts == ALL else tuple(hosts)
        queued = 0
        for name in names:
            if name not in self._target.hosts:
                continue
            if self._admit(name, reason, force):
                queued += int(self.hosts.put(name, [reason]))
        return queued

    def _admit(self, host: str, reason: str, force: bool) -> bool:
        assert self._target is not None
        rec = self._record(host)
        commit = self._target.commit
        if force:
            rec.clear_retry()
            rec.clear_stall()
            return True
        if rec.terminal_commit:
            if rec.terminal_commit == commit:
                # a terminal failure waits for a new commit; a drift tick only scans
                return reason == "drift" and self._scan is not None
            rec.clear_stall()
        if rec.retry is not None:
            if rec.failed_commit == commit:
                rec.retry_reasons.add(reason)  # the backoff timer will bring it back
                return False
            rec.clear_retry()  # a new commit: retry now
            rec.failures = 0
        return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._source_worker(), name="source-worker"))
        for i in range(self._concurrency):
            self._tasks.append(loop.create_task(self._host_worker(), name=f"host-worker-{i}"))
        if self._poll_interval > 0:
            self._timers.append(loop.create_task(self._ticker(self._poll_interval, self._poll), name="poll"))
        self._timers.append(loop.create_task(self._drift_timer(), name="drift-timer"))
        self.request_fetch(then=(ALL,), reason="startup")

    def _poll(self) -> None:
        self.request_fetch(reason="poll")

    def _drift_tick(self) -> None:
        self.request(ALL, "drift")

    async def _drift_timer(self) -> None:
        """Every drift interval (read again each time: it may come from the fleet), or idle."""
        while not self._stopping:
            interval = self._drift_interval()
            if interval <= 0:
                await asyncio.sleep(5.0)
                continue
            await asyncio.sleep(interval)
            if not self._stopping and self._drift_interval() > 0:
                self._drift_tick()

    async def _ticker(self, interval: float, fire: Callable[[], None]) -> None:
        while not self._stopping:
            await asyncio.sleep(interval)
            if not self._stopping:
                fire()

    async def stop(self, grace: float) -> None:
        """Take no new work; give in-flight work ``grace`` seconds, then cancel it."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutdown", in_flight=list(self.hosts.in_flight), grace=grace)
        for rec in self._records.values():
            rec.clear_retry()
        if self._source_retry is not None:
            self._source_retry.cancel()
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        self._timers.clear()
        self.hosts.close()
        self.source.close()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            started = time.monotonic()
            _, pending = await asyncio.wait(tasks, timeout=min(1.0, grace))
            if pending:  # say what a slow stop waits on
                log.info("shutdown: waiting", tasks=sorted(t.get_name() for t in pending), grace=grace)
                left = max(0.0, grace - (time.monotonic() - started))
                _, pending = await asyncio.wait(pending, timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown: cancelled in-flight work after the grace period", tasks=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """For tests and benchmarks: until nothing is queued, in flight or scheduled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = (
                self.hosts.depth
                or self.hosts.in_flight
                or self.source.depth
                or self.source.in_flight
                or self._source_retry is not None
                or any(r.retry is not None for r in self._records.values())
            )
            if not busy:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError("the reconcile loop did not become idle")

    # ------------------------------------------------------------ source worker

    async def _source_worker(self) -> None:
        while True:
            item = await self.source.get()
            if item is None:
                return
            failed = False
            try:
                await self._do_refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                self._source_failed(exc)
            else:
                self.first_refresh_done.set()
            finally:
                self.source.done(SOURCE_KEY, follow_up=not failed)

    async def _do_refresh(self) -> None:
        self.fetches += 1
        target = await self._refresh()
        self._source_failures = 0
        then, force = self._after_fetch, self._after_fetch_force
        self._after_fetch, self._after_fetch_force = set(), False
        if target is None:
            return
        changed = self._target is None or target.commit != self._target.commit
        if changed or (self._target is not None and target.hosts != self._target.hosts):
            for gone in set(self._records) - set(target.hosts):
                self._records.pop(gone).clear_retry()
                self.hosts.discard(gone)
        self._target = target
        if changed:
            self._target_seen_at = time.monotonic()
            self._target_converged = False
            log.info("new target", commit=target.commit, hosts=len(target.hosts))
        # Level-triggered: every host not yet converged on the target is looked at.
        behind = [
            h for h in target.hosts if self._records.get(h, HostRecord()).converged_commit != target.commit
        ]
        self.request(behind, "commit")
        if then:
            self.request(ALL if ALL in then else then, "resync", force=force)

    def _source_retry_fire(self) -> None:
        self._source_retry = None
        self.source.put(SOURCE_KEY, ["retry"])

    def _source_failed(self, exc: BaseException) -> None:
        self._source_failures += 1
        delay = self._backoff.delay(self._source_failures)
        if isinstance(exc, ReconcilerError):
            log.warning("fetch failed", error=str(exc), retry_in=round(delay, 2))
        else:
            log.error("fetch failed", error=type(exc).__name__, retry_in=round(delay, 2), exc_info=exc)
        if self._store is not None:
            self._store.add_event("fetch-failed", user_message(exc))
        if not self._stopping:
            if self._source_retry is not None:
                self._source_retry.cancel()
            self._source_retry = asyncio.get_running_loop().call_later(delay, self._source_retry_fire)
        # Hosts asked for with this fetch are still looked at, against the current target.
        then, force = self._after_fetch, self._after_fetch_force
        self._after_fetch, self._after_fetch_force = set(), False
        if then and self._target is not None:
            self.request(ALL if ALL in then else then, "resync", force=force)

    # ------------------------------------------------------------ host workers

    async def _host_worker(self) -> None:
        while True:
            item = await self.hosts.get()
            if item is None:
                return
            host, reasons = item
            follow_up = True
            try:
                follow_up = await self._reconcile_one(host, reasons)
            finally:
                self.hosts.done(host, follow_up=follow_up)

    async def _reconcile_one(self, host: str, reasons: frozenset[str]) -> bool:
        """Run the step for one host; returns whether a queued follow-up may run now."""
        target = self._target
        if target is None or host not in target.hosts:
            return True
        rec = self._record(host)
        store = self._store
        if rec.terminal_commit == target.commit and self._scan is not None:
            return await self._scan_stalled(host, target, rec)
        if store is not None:
            store.mark_reconciling(host, target.commit)
        started = time.monotonic()
        try:
            outcome = await self._reconcile(host, target, reasons) or Outcome()
        except asyncio.CancelledError:
            if store is not None:
                store.mark_retrying(host, target.commit, "shutdown: reconcile cancelled; resumes on restart")
            self._result(host, "cancelled", started)
            raise
        except Terminal as exc:
            rec.terminal_commit, rec.terminal_reason = target.commit, exc.reason
            rec.failures += 1
            failure = Failure.of(exc)
            log.warning(
                "reconcile stalled", host=host, commit=target.commit, reason=str(exc.reason), error=str(exc)
            )
            if store is not None:
                store.mark_stalled(
                    host, target.commit, f"{exc.reason}: {exc} (waiting for a new commit)", code=exc.reason
                )
                store.add_event("stalled", f"{exc.reason}: {exc}", host=host, commit=target.commit)
            self._failed(HostFailure(host, target.commit, failure, None, rec.failures))
            self._result(host, "terminal", started)
            return self._target is not None and self._target.commit != target.commit
        except Exception as exc:
            rec.failures += 1
            rec.failed_commit = target.commit
            delay = self._backoff.delay(rec.failures)
            message = user_message(exc)
            failure = Failure.of(exc)
            if isinstance(exc, ReconcilerError):
                log.warning(
                    "reconcile failed",
                    host=host,
                    reason=str(failure.reason),
                    error=message,
                    retry_in=round(delay, 2),
                )
            else:
                log.error(
                    "reconcile failed", host=host, error=message, retry_in=round(delay, 2), exc_info=exc
                )
            if store is not None:
                store.mark_retrying(
                    host,
                    target.commit,
                    f"{failure.reason}: {message} (retry {rec.failures} in {delay:.1f}s)",
                    code=failure.reason,
                )
                store.add_event("failed", f"{failure.reason}: {message}", host=host, commit=target.commit)
            self._failed(
                HostFailure(host, target.commit, replace(failure, message=message), delay, rec.failures)
            )
            self._schedule_retry(host, rec, delay, reasons)
            self._result(host, "transient", started)
            # A follow-up for the same commit waits for the backoff; a new commit goes now.
            if self._target is not None and self._target.commit != target.commit:
                rec.clear_retry()
                rec.failures = 0
                return True
            return False
        rec.failures = 0
        rec.failed_commit = ""
        rec.clear_stall()
        rec.clear_retry()
        # Looked at on this commit (applied, or only planned in plan mode): nothing more to do
        # until a new commit, a drift tick or an explicit resync.
        rec.converged_commit = target.commit
        if store is not None:
            if outcome.applied:
                store.mark_ready(host, target.commit, outcome.reason)
            else:
                store.mark_observed(host, target.commit, outcome.reason)
            if outcome.drift:
                store.record_drift(host, outcome.drift)
        self._result(host, "ok", started)
        self._check_converged(target)
        return True

    async def _scan_stalled(self, host: str, target: Target, rec: HostRecord) -> bool:
        """A drift tick on a host stalled on this commit: the drift scan only, never the apply;
        the host stays Stalled."""
        assert self._scan is not None
        started = time.monotonic()
        try:
            found = await self._scan(host, target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("drift scan of a stalled host failed", host=host, error=user_message(exc))
            self._result(host, "scan-failed", started)
            return True
        if found and self._store is not None:
            self._store.record_drift(host, found)
        self._result(host, "scan", started)
        return True

    def _failed(self, failure: HostFailure) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:  # reporting must never stop the loop
                log.exception("on_failure callback failed", host=failure.host)

    def _converged_on(self, host: str) -> str:
        rec = self._records.get(host)
        return rec.converged_commit if rec is not None else ""

    def _schedule_retry(self, host: str, rec: HostRecord, delay: float, reasons: frozenset[str]) -> None:
        rec.clear_retry()
        rec.retry_reasons = set(reasons) | {"retry"}

        def fire() -> None:
            rec.retry = None
            retry_reasons = rec.retry_reasons or {"retry"}
            rec.retry_reasons = set()
            if not self._stopping and self._target is not None and host in self._target.hosts:
                self.hosts.put(host, retry_reasons)

        if not self._stopping:
            rec.retry = asyncio.get_running_loop().call_later(delay, fire)

    def _result(self, host: str, result: str, started: float) -> None:
        if self._on_result is not None:
            self._on_result(host, result, time.monotonic() - started)

    def _check_converged(self, target: Target) -> None:
        if self._target_converged or self._target is None or self._target.commit != target.commit:
            return
        if all(self._converged_on(h) == target.commit for h in target.hosts):
            self._target_converged = True
            elapsed = time.monotonic() - self._target_seen_at
            log.info("converged", commit=target.commit, seconds=round(elapsed, 3))
            if self._on_converged is not None:
                self._on_converged(target.commit, elapsed)
