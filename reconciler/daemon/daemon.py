"""`reconciler run`: wires config, source, store, loop, server, outbox and the engine.

    fleet repo --FleetSource--> newest good commit + Fleet --ReconcileLoop--> per-host step
    each candidate commit --RenderWorker (a process, under limits)--> every host rendered once,
        seeded into the engine's render cache; a broken bound refuses the commit
    webhooks / poll / drift timer / SIGHUP / sync --> the loop's deduplicating queues
    refused commits --> Store (status, events) + Outbox (one mail per commit and reason)
    a host stalled by a terminal failure --> Store (Stalled, reason) + Outbox (one mail per
        host, commit and reason) + metrics; transient failures retry with backoff (loop.py)
    `sync --allow-rollback` --> FleetSource.rollback --> Store (who, when) + one mail

One daemon per state directory (an exclusive lock file). The HTTP server starts before the last
good commit is loaded and rendered, so /healthz answers whatever a commit does. SIGTERM/SIGINT:
kill the render worker, stop taking work, let in-flight reconciles finish within
``shutdown_grace``, then cancel; SIGHUP: fetch and resync every host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from reconciler import __version__, usecases
from reconciler.daemon import mail as mails
from reconciler.daemon.after_apply import AfterApplyVerifier, HostVerify
from reconciler.daemon.config import Config, RunMode
from reconciler.daemon.engine_step import engine_step
from reconciler.daemon.ipsec_settle import REASON as SETTLE_REASON
from reconciler.daemon.ipsec_settle import PairSettler
from reconciler.daemon.loop import ALL, ReconcileLoop
from reconciler.daemon.mail import AdminMail
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.pools import Pools
from reconciler.daemon.process import lock_state_dir, raise_fd_limit
from reconciler.daemon.queue import Backoff
from reconciler.daemon.records import DriftSeen, add_drift
from reconciler.daemon.server import HttpServer
from reconciler.daemon.shard import PeerClient, Shard
from reconciler.daemon.source import FleetLoader, FleetSource, default_loader
from reconciler.daemon.source_types import Refusal, Rejection, RollbackRefused
from reconciler.daemon.status import DaemonStatus
from reconciler.daemon.step import HostFailure, Outcome, ReconcileStep, Target
from reconciler.daemon.store import HostState, JsonObject, Store
from reconciler.domains.bounded_render import RenderAborted, RenderRejected, RenderWorker
from reconciler.drift.scan import DriftFinding
from reconciler.drift.snapshot import display_path
from reconciler.engine import fleet as engine
from reconciler.errors import ReconcilerError, RenderError
from reconciler.fleet.model import Fleet
from reconciler.gitrepo import redact_url
from reconciler.host.connection import ConnectionPool
from reconciler.kinds.resources import Domain
from reconciler.log import get_logger
from reconciler.notify.outbox import Outbox

log = get_logger(__name__)


DriftStep = Callable[[str, Target, ConnectionPool], Awaitable[DriftFinding | int]]


class Daemon(DaemonStatus):
    """The daemon: its parts, the loop's callbacks, the write side of the HTTP API, the lifecycle."""

    def __init__(
        self,
        config: Config,
        *,
        step: ReconcileStep | None = None,
        drift: DriftStep | None = None,
        drift_scan: bool = True,
        loader: FleetLoader = default_loader,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self._lock_fd = lock_state_dir(self.state_dir)
        self.store = Store(self.state_dir / "state.db")
        self.renderer = RenderWorker(config.render)
        self.source = FleetSource(
            config.source,
            self.state_dir / "fleet.git",
            loader=loader,
            last_good=self.store.get_meta("source.good"),
            vet=self._render_commit,
        )
        self.outbox = outbox if outbox is not None else self._default_outbox()
        self.admin_mail = AdminMail(config, self.outbox, lambda: self.source.fleet)
        self._mail_wakeup = self.admin_mail.wakeup
        self._pools = Pools(config)
        self._custom_step = step
        self.drift_io: usecases.Drift | None = None  # the history, outbox and remote (default drift)
        self._drift = drift if drift is not None or not drift_scan else self._default_drift()
        self._scanned_once: set[str] = set()
        self.metrics = DaemonMetrics(
            host_states=self._host_state_counts,
            queue_depth=lambda: [
                (("hosts",), float(self.loop.hosts.depth)),
                (("source",), float(self.loop.source.depth)),
            ],
            in_flight=lambda: [
                (("hosts",), float(len(self.loop.hosts.in_flight))),
                (("source",), float(len(self.loop.source.in_flight))),
            ],
            outbox=self._outbox_counts,
        )
        self.loop = ReconcileLoop(
            reconcile=self._reconcile_host,
            refresh=self._refresh,
            store=self.store,
            concurrency=config.concurrency,
            poll_interval=config.source.poll_interval,
            drift_interval=self._drift_interval,
            backoff=Backoff(base=config.backoff_base, maximum=config.backoff_max),
            on_result=self._on_result,
            on_converged=lambda commit, secs: self.metrics.push_to_converged.observe(secs),
            on_failure=self._on_failure,
            scan=self._scan_stalled if self._drift is not None else None,
        )
        self.verifier = AfterApplyVerifier(
            self._pools,
            busy=lambda: bool(self.loop.hosts.depth or self.loop.hosts.in_flight),
            on_result=self._on_verified,
            on_error=lambda host: self.metrics.verify_runs.inc(1, "error"),
        )
        # pairs the verify found down: their initiators start them again (libipsec)
        self.settler = PairSettler(lambda host: self.loop.request([host], SETTLE_REASON, force=True))
        self.shard = Shard.from_config(config.shard)
        self._peers = PeerClient(self.shard, config.server.read_token)
        self._forwards: set[asyncio.Task[dict[str, int | str]]] = set()
        self.server = HttpServer(config.server, self, self.metrics, shard=self)
        self._stop = asyncio.Event()
        self._started = time.time()

    # ------------------------------------------------------------ drift

    def _default_drift(self) -> DriftStep:
        """The drift use case (usecases.drift_scan_host): /etc snapshot -> history repo -> drift
        mail -> history pushed to ``history_remote`` (no enforcement here: the engine step that
        follows a scan converges the host)."""
        drift = usecases.Drift.open(
            self.state_dir,
            self.config.history_dir,
            remote=self.config.history_remote or None,
            branches=self.config.history_push_branches.value,
            outbox=self.outbox,
            on_push_error=self._history_push_failed,
        )
        self.drift_io = drift

        async def step(host: str, target: Target, pool: ConnectionPool) -> DriftFinding:
            res = await usecases.drift_scan_host(
                drift,
                target.fleet,
                pool,
                host,
                fleet_commit=target.commit,
                enforce=usecases.engine_follows,
                render=lambda fleet, h: engine.render_cached(fleet, h.name),  # the worker's results
            )
            # drift is what changed by hand since the last snapshot (never the reconciler's own)
            paths = tuple(display_path(p) for p in res.drift[:20])
            return DriftFinding(len(res.drift), res.commit or "", paths)

        return step

    def _history_push_failed(self, error: str) -> None:
        self.store.add_event("history-push-failed", error)

    def _drift_interval(self) -> float:
        if self._drift is None:
            return 0.0
        if self.config.drift_interval is not None:
            return self.config.drift_interval
        fleet = self.source.fleet
        return float(fleet.drift.interval_seconds) if fleet is not None else 0.0

    def _drift_report_only(self, target: Target) -> bool:
        drift = getattr(target.fleet, "drift", None)
        return drift is not None and str(getattr(drift.mode, "value", drift.mode)) == "report"

    # ------------------------------------------------------------ mail

    def _default_outbox(self) -> Outbox:
        return Outbox.in_state_dir(self.state_dir)

    def mail(self, key: str, subject: str, body: str) -> bool:
        """Queue one mail to the admins under an idempotency key; False if known or no mail."""
        return self.admin_mail.send(key, subject, body)

    # ------------------------------------------------------------ source

    async def _refresh(self) -> Target | None:
        try:
            st = await self.source.refresh()
        except Exception:
            self.metrics.fetches.inc(1, "error")
            raise
        self.metrics.fetches.inc(1, "ok")
        if st.changed:
            self.store.set_meta("source.good", st.good)
            self.store.add_event("commit", "new good commit", commit=st.good)
        self.store.set_meta("source.head", st.head)
        if st.rejection is not None:
            self._reject(st.rejection)
        if st.fleet is None:
            return None
        hosts = tuple(st.fleet.host_names())
        gone = self.store.mark_removed_except(set(hosts), st.good)
        if gone:
            self.store.add_event("hosts-removed", ", ".join(gone), commit=st.good)
        return Target(st.good, st.fleet, self.shard.owned(hosts))  # sharded: only this replica's

    async def _render_commit(self, commit: str, fleet: Fleet) -> Refusal | None:
        """Render every host of a candidate commit in the render worker, before it may become
        the good commit; the results feed the engine (no host is rendered in this process)."""
        started = time.monotonic()
        result = await self.renderer.render(fleet, tuple(fleet.host_names()))
        if isinstance(result, RenderRejected):
            log.warning(
                "commit refused by the render limits", commit=commit, limit=result.limit, reason=result.reason
            )
            return Refusal("render-limit", f"commit {commit[:12]}: {result.reason}")
        engine.seed_rendered(fleet, result)
        failed = sorted(h for h, r in result.items() if isinstance(r, RenderError))
        log.info("commit rendered", commit=commit, hosts=len(result), failed=failed,
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip
        return None

    def _reject(self, rejection: Rejection) -> None:
        if not self.store.reject_commit(rejection.commit, f"{rejection.kind}: {rejection.reason}"):
            return  # already reported (also across restarts)
        self.metrics.rejected.inc(1, rejection.kind)
        self.store.add_event("commit-rejected", rejection.reason, commit=rejection.commit)
        good = rejection.good or self.source.good
        self.mail(rejection.key, *mails.rejected(self.config.source, rejection, good))

    async def rollback(self, commit: str, requested_by: str) -> tuple[bool, dict[str, Any]]:
        """``reconciler sync --allow-rollback``: move the good commit back on an admin's word
        (the source checks the commit); recorded in the store, the events and one mail."""
        try:
            done = await self.source.rollback(commit)
        except (RollbackRefused, ReconcilerError) as exc:
            log.warning("rollback refused", commit=commit, by=requested_by, reason=str(exc))
            self.store.add_event("rollback-refused", f"{exc} (asked by {requested_by})", commit=commit)
            return False, {"reason": str(exc)}
        at = time.time()
        record: JsonObject = {"commit": done.commit, "previous": done.previous, "head": done.head,
                  "by": requested_by, "at": at}  # fmt: skip
        self.store.set_meta("source.good", done.commit)
        self.store.set_json("source.rollback", record)
        previous = done.previous[:12] or "(none)"
        message = f"rolled back from {previous} to {done.commit[:12]}, allowed by {requested_by}"
        self.store.add_event("rollback", message, commit=done.commit)
        key = f"rollback:{done.previous}:{done.commit}"
        self.mail(key, *mails.rolled_back(self.config.source, done, requested_by, at))
        self.loop.request_fetch(then=(ALL,), force=True, reason="rollback")
        return True, {"status": "rolled back", **record}

    # ------------------------------------------------------------ hosts

    async def _reconcile_host(self, host: str, target: Target, reasons: frozenset[str]) -> Outcome:
        """Drift scan first (so a hand edit is recorded and mailed before it is put back), then
        the engine. The scan runs on the drift timer and on a host's first reconcile after start
        (edits made while the daemon was down); in drift mode ``report`` a timer-only pass
        records and mails but does not converge."""
        pool = await self._pools.acquire(target) if self._custom_step is None or self._drift else None
        try:
            found = 0
            scan = self._drift is not None and ("drift" in reasons or host not in self._scanned_once)
            if scan and self._drift is not None and pool is not None:
                started = time.monotonic()
                found = self._record_drift(host, target, await self._drift(host, target, pool))
                self.metrics.phase_duration.observe(time.monotonic() - started, "drift_scan")
                self._scanned_once.add(host)
                if reasons <= {"drift"} and self._drift_report_only(target):
                    return Outcome(applied=True, reason="drift scan (report mode)", drift=found)
            started = time.monotonic()
            if self._custom_step is not None or pool is None:
                assert self._custom_step is not None  # no pool only with a custom step
                outcome = await self._custom_step(host, target, reasons) or Outcome()
            else:
                step = await engine_step(
                    host,
                    target,
                    pool,
                    apply=self.config.mode is RunMode.APPLY,
                    adopt=host in self.config.adopt,
                )
                outcome = step.outcome
                if step.plan is not None:
                    self.store.set_record(host, "plan", step.plan)
                if outcome.changes:
                    self.metrics.applied_changes.inc(outcome.changes, host)
                    self.store.add_event("applied", outcome.reason, host=host, commit=target.commit)
                    if self.config.mode is RunMode.APPLY:
                        self.verifier.add(host, target, step.domains)
                if SETTLE_REASON in reasons and self.config.mode is RunMode.APPLY:
                    for verified in self.settler.reverify(host):
                        self.verifier.add(verified, target, step.domains | {Domain.IPSEC})
            self.metrics.phase_duration.observe(time.monotonic() - started, "engine")
            if outcome.applied and self.config.mode is RunMode.APPLY:
                self.metrics.last_apply.set(time.time(), host)
            return replace(outcome, drift=found) if found else outcome
        finally:
            if pool is not None:
                await self._pools.release(target)

    async def _scan_stalled(self, host: str, target: Target) -> int:
        """A drift tick on a host stalled on ``target``: the drift scan, never the engine."""
        if self._drift is None:
            return 0
        pool = await self._pools.acquire(target)
        try:
            found = self._record_drift(host, target, await self._drift(host, target, pool))
        finally:
            await self._pools.release(target)
        self._scanned_once.add(host)
        return found

    def _record_drift(self, host: str, target: Target, result: DriftFinding | int) -> int:
        """One scan's hand edits: metrics, a "drift" event and the host's drift log. Changes the
        fleet made are "applied" events (the engine step), never counted here."""
        seen = DriftSeen.of(result)
        self.metrics.drift_scans.inc()
        if seen.history_commit:
            self._mail_wakeup.set()  # the scan may have queued a mail (also for our own changes)
        if not seen.count:
            return 0
        self.metrics.drift.inc(seen.count, host)
        self.metrics.drift_events.inc(1, host)
        self.store.add_event("drift", seen.message(), host=host, commit=target.commit)
        previous = self.store.record(host, "drift")
        entry = seen.as_json(time.time(), target.commit)
        self.store.set_record(host, "drift", add_drift(previous[1] if previous else None, entry))
        return seen.count

    # ------------------------------------------------------------ failures

    def _on_failure(self, hf: HostFailure) -> None:
        """Count every failed reconcile by reason; a terminal one (the host is Stalled on the
        commit) is mailed once per host, commit and reason (the outbox's idempotency key, which
        holds across restarts)."""
        reason = hf.failure.reason
        self.metrics.host_failures.inc(1, str(reason), "terminal" if hf.terminal else "transient")
        if not hf.terminal:
            return
        self.metrics.stalls.inc(1, str(reason))
        self.mail(f"stall:{hf.host}:{hf.commit}:{reason}", *mails.stalled(self.config.source, hf))

    def forget(self, hosts: Sequence[str]) -> tuple[list[str], list[str]]:
        """Acknowledge hosts shown as removed from the fleet: drop their status rows. Returns
        (forgotten, refused); a host still in the fleet (or unknown) is refused."""
        target = self.loop.target
        current = set(target.hosts) if target is not None else set()
        wanted = [h for h in hosts if h not in current]
        forgotten, refused = self.store.forget_removed(wanted)
        refused = [h for h in hosts if h in current] + refused
        if forgotten:
            self.store.add_event("hosts-forgotten", ", ".join(forgotten))
        return forgotten, refused

    # ------------------------------------------------------------ verify after apply

    def _on_verified(self, host: str, result: HostVerify) -> None:
        """A batch of reconciler.daemon.after_apply proved ``host`` live (or not): metrics and events."""
        self.metrics.verify_runs.inc(1, "ok" if result.ok else "failed")
        self.metrics.phase_duration.observe(result.seconds, "verify")
        self.store.set_record(host, "verify", result.as_json())
        for status in ("pass", "fail", "skip"):
            self.metrics.verify_checks.set(float(result.counts.get(status, 0)), host, status)
        if not result.ok:
            failed = result.counts.get("fail", 0)
            message = f"{failed} live check(s) failed"
            self.store.add_event("verify-failed", message, host=host, commit=result.commit)
            target = self.loop.target
            if target is not None and target.commit == result.commit:
                self.settler.on_verified(target.fleet, result.commit, host, result.checks)

    def _on_result(self, host: str, result: str, seconds: float) -> None:
        self.metrics.reconciles.inc(1, result)
        self.metrics.reconcile_duration.observe(seconds, result)

    def _host_state_counts(self) -> list[tuple[tuple[str, ...], float]]:
        counts = {s.value: 0 for s in HostState}
        for h in self.store.hosts():
            counts[h.state.value] += 1
        return [((k,), float(v)) for k, v in counts.items()]

    # ------------------------------------------------------------ DaemonView (HTTP)

    def push_hint(self, provider: str) -> None:
        self.loop.request_fetch(reason=f"webhook:{provider}")

    def sync(self, hosts: Sequence[str]) -> tuple[int, list[str]]:
        target = self.loop.target
        if hosts and target is not None:
            fleet = self.source.fleet
            known = set(fleet.host_names()) if fleet is not None else set(target.hosts)
            unknown = [h for h in hosts if h not in known]  # another replica's host: its sync
            if unknown:
                return 0, unknown
        self.loop.request_fetch(then=tuple(hosts) or (ALL,), force=True, reason="sync")
        return (len(hosts) or (len(target.hosts) if target else 0)), []

    # ------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        aio = asyncio.get_running_loop()
        aio.add_signal_handler(signal.SIGTERM, self.request_stop)
        aio.add_signal_handler(signal.SIGINT, self.request_stop)
        aio.add_signal_handler(
            signal.SIGHUP, lambda: self.loop.request_fetch(then=(ALL,), force=True, reason="sighup")
        )

    def _remove_signals(self) -> None:
        aio = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            aio.remove_signal_handler(sig)

    async def _start_loop(self) -> None:
        """Load and render the last good commit (in the render worker), then start the loop.
        Runs while the HTTP server already answers."""
        try:
            try:
                await self.source.prepare()
            except RenderAborted:
                return  # stopping
            except ReconcilerError as exc:  # e.g. a git error: the first fetch tries again
                log.error("cannot load the last good commit", error=str(exc))
            if self.source.rejection is not None:
                self._reject(self.source.rejection)
            if self.source.good and self.source.fleet is not None:
                fleet = self.source.fleet
                self.loop.seed(Target(self.source.good, fleet, self.shard.owned(fleet.host_names())))
            self.loop.start()
        except Exception:  # a bug: a daemon without its loop must not look alive
            log.exception("daemon start-up failed")
            self.request_stop()

    async def run(self, *, install_signals: bool = True) -> int:
        self.admin_mail.publish_credentials()
        await self.source.setup()  # configuration errors stop the daemon before it serves
        await self.renderer.start()  # imports while the rest starts
        await self.server.start()
        if install_signals:
            self._install_signals()
        aio = asyncio.get_running_loop()
        mail_task = aio.create_task(self.admin_mail.worker(self._stop), name="mail")
        startup = aio.create_task(self._start_loop(), name="startup")
        log.info(
            "daemon started",
            version=__version__,
            url=redact_url(self.config.source.url),
            branch=self.config.source.branch,
            mode=self.config.mode.value,
            port=self.server.port,
            last_good=self.source.good,
            render_limits=self.config.render.describe(),
        )
        try:
            await self._stop.wait()
        finally:
            log.info("daemon stopping", grace=self.config.shutdown_grace)
            await self.renderer.close()  # a render in flight ends now (it is pure: nothing lost)
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
            self.settler.close()
            await self.loop.stop(self.config.shutdown_grace)
            await self.verifier.close()
            await self.server.stop()
            await asyncio.gather(*self._forwards, return_exceptions=True)
            await self._peers.close()
            mail_task.cancel()
            await asyncio.gather(mail_task, return_exceptions=True)
            await self._pools.close_all()
            if install_signals:
                self._remove_signals()
            self.close()
        log.info("daemon stopped")
        return 0

    def close(self) -> None:
        self.store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def run_daemon(config: Config) -> int:
    raise_fd_limit()
    daemon = Daemon(config)
    return asyncio.run(daemon.run())
