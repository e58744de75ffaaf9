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
import fcntl
import importlib
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from reconciler import __version__
from reconciler.daemon.after_apply import AfterApplyVerifier, HostVerify
from reconciler.daemon.config import Config, RunMode, redact_url
from reconciler.daemon.loop import ALL, Backoff, HostFailure, Outcome, ReconcileLoop, ReconcileStep, Target
from reconciler.daemon.metrics import DaemonMetrics
from reconciler.daemon.records import DriftSeen, add_drift, plan_record
from reconciler.daemon.server import HttpServer
from reconciler.daemon.shard import PeerClient, Shard, merge_status
from reconciler.daemon.source import (
    FleetLoader,
    FleetSource,
    Refusal,
    Rejection,
    RollbackRefused,
    default_loader,
)
from reconciler.daemon.statuspage.mesh import pair_state
from reconciler.daemon.store import HostState, Store
from reconciler.domains.bounded_render import RenderAborted, RenderRejected, RenderWorker
from reconciler.errors import Failure, Reason, ReconcilerError, RenderError, Terminal
from reconciler.kinds.resources import Domain
from reconciler.log import get_logger

log = get_logger(__name__)

OUTBOX_INTERVAL = 5.0
MESH_MAX_LINKS = 2000  # /status lists the mesh's pairs up to this many
SMTP_USER_VAR = "RECONCILER_SMTP_USERNAME"
SMTP_PASSWORD_VAR = "RECONCILER_SMTP_PASSWORD"  # noqa: S105 (a variable name, not a value)


class MailOutbox(Protocol):
    """The part of reconciler.notify.outbox.Outbox the daemon uses."""

    def enqueue(self, key: str, mail: Any, *, dedupe: Any = ()) -> bool: ...

    async def deliver_due(self, smtp: Any, *, limit: int = 100, timeout: float = 30) -> Any: ...

    def counts(self) -> Any: ...


DriftStep = Callable[[str, Target, Any], Awaitable[Any]]  # a count or a drift.scan.DriftFinding


class StateDirLocked(Terminal):
    pass


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(f"{state_dir}: another reconciler daemon uses this state directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclass
class _PoolEntry:
    pool: Any
    targets: dict[str, Any]
    users: int = 0


class _Pools:
    """SSH connection pools, reused across commits while the fleet's SSH targets (addresses,
    ports, users, host keys) stay the same, so a push costs no new SSH handshakes. When the
    targets change, a new pool is made and the old one closes once nothing uses it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._current: _PoolEntry | None = None
        self._by_commit: dict[str, _PoolEntry] = {}

    def _targets(self, fleet: Any) -> dict[str, Any]:
        connection = importlib.import_module("reconciler.host.connection")
        ssh = self.config.ssh
        targets: dict[str, Any] = connection.targets_for(
            fleet,
            known_hosts=str(ssh.known_hosts) if ssh.known_hosts else None,
            client_keys=[str(p) for p in ssh.identity],
            netns=ssh.netns or None,
        )
        return targets

    def _make(self, targets: dict[str, Any]) -> Any:
        connection = importlib.import_module("reconciler.host.connection")
        ssh = self.config.ssh
        return connection.ConnectionPool(
            targets,
            connect_timeout=ssh.connect_timeout,
            command_timeout=ssh.command_timeout,
            max_concurrency=max(1, self.config.concurrency) * 2,
        )

    async def acquire(self, target: Target) -> Any:
        entry = self._by_commit.get(target.commit)
        if entry is None:
            targets = self._targets(target.fleet)
            current = self._current
            if current is not None and current.targets == targets:
                entry = current
            else:
                entry = _PoolEntry(self._make(targets), targets)
                self._current = entry
                if current is not None and current.users == 0:
                    await self._close(current)
            self._by_commit[target.commit] = entry
        entry.users += 1
        return entry.pool

    async def release(self, target: Target) -> None:
        entry = self._by_commit.get(target.commit)
        if entry is None:
            return
        entry.users -= 1
        if entry is not self._current and entry.users == 0:
            await self._close(entry)

    async def _close(self, entry: _PoolEntry) -> None:
        for commit in [c for c, e in self._by_commit.items() if e is entry]:
            del self._by_commit[commit]
        await entry.pool.close()

    async def close_all(self) -> None:
        entries = {id(e): e for e in self._by_commit.values()}
        if self._current is not None:
            entries[id(self._current)] = self._current
        self._by_commit.clear()
        self._current = None
        for entry in entries.values():
            await entry.pool.close()


@dataclass(frozen=True)
class EngineStep:
    outcome: Outcome
    domains: frozenset[Domain] = frozenset()  # what the apply changed (for verify after apply)
    plan: dict[str, Any] | None = None  # the plan as the status page shows it (records.plan_record)


async def engine_step(
    host: str,
    target: Target,
    pool: Any,
    *,
    apply: bool,
    firewall_window: float | None = None,
    adopt: bool = False,
) -> EngineStep:
    """One host through reconciler.engine.fleet.reconcile_fleet. A failed host raises the error its
    outcome's typed failure stands for (Terminal or Transient by its reason; loop.py acts on it).
    ``adopt``: take the host over when it claims another fleet or host name (config ``adopt``);
    otherwise that is a Terminal refusal (reason ``identity-mismatch``)."""
    engine = importlib.import_module("reconciler.engine.fleet")
    # diffs for the status page's last plan: read only when something differs (a second round
    # trip on a reconcile that changes something; the no-op path is unchanged)
    kwargs: dict[str, Any] = {"apply": apply, "fetch_diffs": True, "adopt": adopt}
    if firewall_window is not None:
        kwargs["firewall_window"] = firewall_window
    result = await engine.reconcile_fleet(target.fleet, [host], pool, **kwargs)
    out = result.hosts[0]
    if out.status in (engine.ERROR, engine.FAILED):
        failure = out.failure or Failure(Reason.FAILED, out.error or out.status)
        raise failure.error()
    if out.status == engine.CHANGES:
        n = len(out.plan.actions) if out.plan is not None else 0
        reason = f"plan mode: {n} change(s) pending"
        record = plan_record(out.plan, commit=target.commit, applied=False, summary=reason)
        return EngineStep(Outcome(applied=False, reason=reason), plan=record)
    if out.status == engine.APPLIED and out.result is not None:
        n = out.result.changed()
        domains = frozenset(o.action.domain for o in out.result.outcomes if o.status == "done")
        reason = f"applied {n} change(s)"
        record = plan_record(out.plan, commit=target.commit, applied=True, summary=reason)
        return EngineStep(Outcome(applied=True, reason=reason, changes=n), domains, record)
    reason = out.plan.noop_reason if out.plan is not None and out.plan.noop_reason else "in sync"
    return EngineStep(Outcome(applied=True, reason=reason))


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        step: ReconcileStep | None = None,
        drift: DriftStep | None = None,
        drift_scan: bool = True,
        loader: FleetLoader = default_loader,
        outbox: MailOutbox | None = None,
    ) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self._lock_fd = _lock_state_dir(self.state_dir)
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
        self._pools = _Pools(config)
        self._custom_step = step
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
        self.shard = Shard.from_config(config.shard)
        self._peers = PeerClient(self.shard, config.server.read_token)
        self._forwards: set[asyncio.Task[dict[str, int | str]]] = set()
        self.server = HttpServer(config.server, self, self.metrics, shard=self)
        self._stop = asyncio.Event()
        self._mail_wakeup = asyncio.Event()
        self._started = time.time()

    # ------------------------------------------------------------ drift

    def _default_drift(self) -> DriftStep:
        """reconciler.drift.scan's scan: /etc snapshot -> history repo -> drift mail (no enforcement
        here: the engine step that follows a scan converges the host)."""
        history_mod = importlib.import_module("reconciler.drift.history")
        drift_mod = importlib.import_module("reconciler.drift.scan")
        history = history_mod.HistoryRepo.open(self.config.history_dir, self.state_dir)
        engine = importlib.import_module("reconciler.engine.fleet")
        step: DriftStep = drift_mod.make_daemon_step(
            history,
            self.outbox,
            self.state_dir,
            enforce=drift_mod.engine_follows,
            render=lambda fleet, host: engine.render_cached(fleet, host.name),  # the worker's results
        )
        return step

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

    def _default_outbox(self) -> MailOutbox | None:
        try:
            notify = importlib.import_module("reconciler.notify.outbox")
        except ImportError:  # pragma: no cover - notify ships with the package
            return None
        box: MailOutbox = notify.Outbox.in_state_dir(self.state_dir)
        return box

    def _mail_settings(self) -> tuple[Any, tuple[str, ...], str] | None:
        """(fleet-model SmtpSettings, recipients, sender), config first, then the fleet's."""
        model = importlib.import_module("reconciler.fleet.model")
        cfg = self.config.smtp
        fleet_mail = None
        fleet = self.source.fleet
        if fleet is not None and getattr(fleet, "notifications", None) is not None:
            fleet_mail = fleet.notifications.mail
        to = cfg.to or (tuple(fleet_mail.to) if fleet_mail is not None else ())
        if not to:
            return None
        if cfg.host:
            smtp = model.SmtpSettings(
                host=cfg.host,
                port=cfg.port,
                security=model.SmtpSecurity(cfg.security.value),
                username_env=SMTP_USER_VAR if cfg.username else None,
                password_env=SMTP_PASSWORD_VAR if cfg.password else None,
            )
            sender = cfg.sender
        elif fleet_mail is not None:
            smtp, sender = fleet_mail.smtp, fleet_mail.sender
        else:
            return None
        return smtp, tuple(to), sender

    def _publish_smtp_credentials(self) -> None:
        # notify reads credentials from named environment variables; the config may have read
        # them from a file. Child processes never see them: source.Git scrubs RECONCILER_*.
        if self.config.smtp.username:
            os.environ[SMTP_USER_VAR] = self.config.smtp.username
        if self.config.smtp.password:
            os.environ[SMTP_PASSWORD_VAR] = self.config.smtp.password.reveal()

    def mail(self, key: str, subject: str, body: str) -> bool:
        """Queue one mail to the admins under an idempotency key; False if known or no mail."""
        settings = self._mail_settings()
        if settings is None or self.outbox is None:
            log.warning("no mail recipients configured; not mailed", key=key)
            return False
        _, to, sender = settings
        notify = importlib.import_module("reconciler.notify.outbox")
        new = self.outbox.enqueue(key, notify.Mail(subject=subject, body=body, to=to, sender=sender))
        if new:
            self._mail_wakeup.set()
        return bool(new)

    async def _mail_worker(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._mail_wakeup.wait(), OUTBOX_INTERVAL)
            except TimeoutError:
                pass
            self._mail_wakeup.clear()
            settings = self._mail_settings()
            if settings is None or self.outbox is None:
                continue
            try:
                await self.outbox.deliver_due(settings[0], timeout=self.config.smtp.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # delivery problems never stop the daemon
                log.warning("mail delivery failed", error=type(exc).__name__)

    def _outbox_counts(self) -> list[tuple[tuple[str, ...], float]]:
        if self.outbox is None:
            return []
        try:
            c = self.outbox.counts()
        except Exception:
            return []
        return [(("pending",), float(c.pending)), (("sent",), float(c.sent))]

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

    async def _render_commit(self, commit: str, fleet: Any) -> Refusal | None:
        """Render every host of a candidate commit in the render worker, before it may become
        the good commit; the results feed the engine (no host is rendered in this process)."""
        started = time.monotonic()
        result = await self.renderer.render(fleet, tuple(fleet.host_names()))
        if isinstance(result, RenderRejected):
            log.warning(
                "commit refused by the render limits", commit=commit, limit=result.limit, reason=result.reason
            )
            return Refusal("render-limit", f"commit {commit[:12]}: {result.reason}")
        importlib.import_module("reconciler.engine.fleet").seed_rendered(fleet, result)
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
        subject = f"[reconciler] commit {rejection.commit[:12]} refused: {rejection.kind}"
        body = (
            f"The fleet repo {redact_url(self.config.source.url)} (branch {self.config.source.branch}) has\n"
            f"head {rejection.commit}, which will not be applied:\n\n  {rejection.reason}\n\n"
            f"Hosts stay on the last good commit: {good or '(none yet)'}.\n"
            "Push a fixed (and, if verification is on, properly signed) commit to resume.\n"
        )
        self.mail(rejection.key, subject, body)

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
        record = {"commit": done.commit, "previous": done.previous, "head": done.head,
                  "by": requested_by, "at": at}  # fmt: skip
        self.store.set_meta("source.good", done.commit)
        self.store.set_json("source.rollback", record)
        previous = done.previous[:12] or "(none)"
        message = f"rolled back from {previous} to {done.commit[:12]}, allowed by {requested_by}"
        self.store.add_event("rollback", message, commit=done.commit)
        url = redact_url(self.config.source.url)
        body = (
            f"The applied commit of {url} (branch {self.config.source.branch}) was moved back on request:\n\n"
            f"  from {done.previous or '(none)'}\n  to   {done.commit}\n  by   {requested_by}\n"
            f"  at   {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))}\n\n"
            f"The branch head is {done.head}. Hosts converge to {done.commit[:12]} now.\n"
        )
        self.mail(
            f"rollback:{done.previous}:{done.commit}", f"[reconciler] rolled back to {done.commit[:12]}", body
        )
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
            if scan and self._drift is not None:
                started = time.monotonic()
                found = self._record_drift(host, target, await self._drift(host, target, pool))
                self.metrics.phase_duration.observe(time.monotonic() - started, "drift_scan")
                self._scanned_once.add(host)
                if reasons <= {"drift"} and self._drift_report_only(target):
                    return Outcome(applied=True, reason="drift scan (report mode)", drift=found)
            started = time.monotonic()
            if self._custom_step is not None:
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

    def _record_drift(self, host: str, target: Target, result: Any) -> int:
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
        subject = f"[reconciler] {hf.host} stalled on commit {hf.commit[:12]}: {reason}"
        body = (
            f"Host {hf.host} did not converge on commit {hf.commit} of {redact_url(self.config.source.url)}\n"
            f"(branch {self.config.source.branch}), and retrying the same commit cannot help:\n\n"
            f"  reason: {reason}\n\n{_indent(hf.failure.message)}\n\n"
            f"Nothing more is tried on {hf.host} for this commit. Push a fixed commit (or, once the\n"
            f"cause is fixed outside the repo, run `reconciler sync --host {hf.host}`) to resume.\n"
        )
        self.mail(f"stall:{hf.host}:{hf.commit}:{reason}", subject, body)

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

    def ready(self) -> bool:
        return self.loop.first_refresh_done.is_set()

    def status(self) -> dict[str, Any]:
        target = self.loop.target
        rows = {h.name: h.as_json() for h in self.store.hosts()}
        names = list(target.hosts) if target is not None else sorted(rows)
        hosts = []
        for name in names:
            row = rows.get(name) or {"name": name, "state": HostState.UNKNOWN.value, "reason": "", "code": "",
                                     "applied_commit": "", "attempted_commit": "", "last_drift_at": None,
                                     "drift_count": 0, "removed_commit": ""}  # fmt: skip
            if row["state"] == HostState.REMOVED.value:  # back in the fleet, not reconciled yet
                row.update(state=HostState.UNKNOWN.value, reason="", removed_commit="")
            row.update(self.loop.host_info(name))
            hosts.append(row)
        # hosts that left the fleet stay visible until acknowledged (reconciler sync --forget)
        for name in sorted(set(rows) - set(names)):
            if rows[name]["state"] == HostState.REMOVED.value:
                hosts.append({**rows[name], "failures": 0, "waiting_for_new_commit": False,
                              "retry_scheduled": False})  # fmt: skip
        rejection = self.source.rejection
        outbox = dict((k[0], v) for k, v in self._outbox_counts())
        return {
            "version": __version__,
            "mode": self.config.mode.value,
            "ready": self.ready(),
            "started_at": self._started,
            "source": {
                "url": redact_url(self.config.source.url),
                "branch": self.config.source.branch,
                "verify": self.config.source.verify.value,
                "head": self.source.head or self.store.get_meta("source.head"),
                "good": self.source.good,
                "rejection": None
                if rejection is None
                else {
                    "commit": rejection.commit,
                    "kind": rejection.kind,
                    "reason": rejection.reason,
                    "good": rejection.good or self.source.good,
                },
                "last_rollback": self.store.get_json("source.rollback"),
            },
            "queue": {"depth": self.loop.hosts.depth, "in_flight": list(self.loop.hosts.in_flight)},
            **({"scope": "local", "shard": self.shard.describe()} if self.shard.sharded else {}),
            "hosts": hosts,
            "events": [e.as_json() for e in self.store.events(limit=50)],
            "outbox": outbox,
            "verify": {h: v.as_json() for h, v in sorted(self.verifier.results.items()) if h in names},
            "mesh": self._mesh(target),
        }

    def _mesh(self, target: Target | None) -> dict[str, Any]:
        """The mesh picture's data: hosts with their site, linked pairs with their state."""
        if target is None:
            return {"hosts": [], "links": []}
        fleet = target.fleet
        pairs = fleet.link_pairs()
        if len(pairs) > MESH_MAX_LINKS:  # a picture of that many edges says nothing: counts only
            return {"hosts": [], "links": [], "links_omitted": len(pairs)}
        checks: dict[str, list[dict[str, Any]]] = {}
        for name in target.hosts:
            live = self.verifier.results.get(name)
            stored = self.store.record(name, "verify") if live is None else None
            checks[name] = (
                list(live.checks)
                if live is not None
                else list((stored[1] if stored else {}).get("checks", []))
            )
        keys = set(getattr(fleet, "public_keys", {}) or {})
        hosts = [
            {"name": h.name, "site": str(getattr(h, "site", None) or getattr(h, "location", None) or "")}
            for h in fleet.hosts
        ]
        links = [{"a": a, "b": b, "state": pair_state(a, b, keys, checks)} for a, b in pairs]
        return {"hosts": hosts, "links": links}

    async def host_page(self, name: str) -> dict[str, Any] | None:
        """Everything the host page shows (None: not a host of the fleet or of the store)."""
        row = next((h for h in self.status()["hosts"] if h["name"] == name), None)
        if row is None:
            return None
        out = dict(row)
        plan = self.store.record(name, "plan")
        out["plan"], out["plan_at"] = (plan[1], plan[0]) if plan else (None, None)
        live = self.verifier.results.get(name)
        stored = self.store.record(name, "verify")
        out["verify"] = live.as_json() if live is not None else (stored[1] if stored else None)
        drift = self.store.record(name, "drift")
        out["drift"] = drift[1] if drift else []
        out["events"] = [e.as_json() for e in self.store.events(limit=30, host=name)]
        out["last_apply_at"] = self.metrics.last_apply.value(name) or None
        out["last_mail"] = self._last_mail(name)
        for key in ("applied", "attempted"):
            commit = str(row.get(f"{key}_commit") or "")
            out[f"{key}_info"] = await self.source.commit_summary(commit) if commit else {}
        return out

    def _last_mail(self, host: str) -> dict[str, str] | None:
        """The newest mail about ``host`` (subject and status only: bodies may quote diffs)."""
        messages = getattr(self.outbox, "messages", None)
        if messages is None:
            return None
        try:
            found = [m for m in messages() if f":{host}:" in m[0]]
        except Exception:  # the outbox is advisory here
            return None
        return {"subject": found[-1][2], "status": found[-1][1]} if found else None

    async def commits_page(self) -> dict[str, Any]:
        by_commit: dict[str, list[str]] = {}
        for h in self.status()["hosts"]:
            by_commit.setdefault(str(h.get("applied_commit") or ""), []).append(str(h["name"]))
        running = []
        for commit, names in sorted(by_commit.items(), key=lambda kv: -len(kv[1])):
            info = await self.source.commit_summary(commit) if commit else {}
            running.append({"commit": commit, "subject": info.get("subject", ""), "hosts": names})
        rejected = [{"commit": c, "reason": r, "at": a} for c, r, a in self.store.rejected_commits()]
        return {"running": running, "rejected": rejected}

    # ------------------------------------------------------------ shard (reconciler/daemon/shard.py)

    @property
    def sharded(self) -> bool:
        return self.shard.sharded

    async def fleet_status(self) -> dict[str, Any]:
        """This replica's status merged with its peers': every host of the fleet, with its owner."""
        local = self.status()
        peers = await self._peers.statuses()
        fleet = self.source.fleet
        names = list(fleet.host_names()) if fleet is not None else [h["name"] for h in local["hosts"]]
        return merge_status(self.shard, local, peers, names)

    def forward_hook(self, provider: str, headers: Any, body: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._peers.forward_hook(provider, headers, body))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)  # forward_hook logs its own failures

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
        self._publish_smtp_credentials()
        await self.source.setup()  # configuration errors stop the daemon before it serves
        await self.renderer.start()  # imports while the rest starts
        await self.server.start()
        if install_signals:
            self._install_signals()
        aio = asyncio.get_running_loop()
        mail_task = aio.create_task(self._mail_worker(), name="mail")
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


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.splitlines())


def _raise_fd_limit() -> None:
    """One socket per host: a 1,000-host fleet passes systemd's default soft limit of 1,024 open
    files; take the hard limit (the soft one is only a default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_daemon(config: Config) -> int:
    _raise_fd_limit()
    daemon = Daemon(config)
    return asyncio.run(daemon.run())
