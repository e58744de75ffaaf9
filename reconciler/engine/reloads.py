"""Reloads and services of an apply: each affected handler once, after all its files are
swapped, proven by its kind's probe (``reconciler.kinds.registry.probe_for``); a failed reload
restores the handler's files and reloads again; a declared service down is started (and
proven) instead of "reloaded"; services enabled and started."""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.engine.run import DEFAULT_TIMEOUT, HostRun, result_text
from reconciler.engine.transaction import restore_handler
from reconciler.errors import Reason
from reconciler.kinds import service_manager
from reconciler.kinds.actions import (
    ActionKind,
)
from reconciler.kinds.kind import planned
from reconciler.kinds.registry import probe_for
from reconciler.kinds.resources import (
    Service,
)
from reconciler.log import get_logger

log = get_logger(__name__)

# ---------------------------------------------------------------- reloads and services


@dataclass(frozen=True)
class _Reload:
    """What reloading one handler did."""

    ok: bool
    text: str
    started: bool = False  # its service was down: started (not reloaded) and proven
    down: bool = False  # not running, and no declared service to start: nothing reloaded


def _service_of(run: HostRun, handler: str) -> Service | None:
    """The declared, wanted-running service a handler reloads (``Handler.service``)."""
    try:
        name = run.desired.handler(handler).service
    except KeyError:
        return None
    if not name:
        return None
    return next((s for s in run.desired.services if s.name == name and s.running), None)


async def _start_and_prove(run: HostRun, handler: str, service: Service) -> _Reload:
    """Start a service that is down on the files that are live now, and prove it runs: the
    service's own start and status probe (``service_manager.start_service``), then for Apache a live
    master with a serving worker generation that survives a second."""
    conn = await run.conn()
    started = await service_manager.start_service(conn, service, run.plan.init_system)
    if not started.ok:
        return _Reload(False, started.message, started=True)
    probe = probe_for(run.desired.handler(handler))
    if probe is not None:
        ok, text = await probe.prove_started(conn, timeout=DEFAULT_TIMEOUT)
        if not ok:
            return _Reload(False, f"{service.name} started, but {text}", started=True)
        return _Reload(True, f"{started.message}; {text}", started=True)
    return _Reload(True, started.message, started=True)


async def _reload_once(run: HostRun, handler: str) -> _Reload:
    h = run.desired.handler(handler)
    conn = await run.conn()
    if h.only_if_running:
        probe = await conn.run(h.only_if_running, timeout=30)
        if probe.exit_status != 0:
            service = _service_of(run, handler)
            if service is None:
                return _Reload(True, "not running: nothing to reload", down=True)
            # never "reloaded" into a service that is not running: start it on these files
            return await _start_and_prove(run, handler, service)
    if not h.reload:
        return _Reload(True, "")
    proof = probe_for(h)
    if proof is not None:
        # the handler's own proof: the new configuration must be live, not just signalled
        ok, text = await proof.reload_proven(conn, h.reload, timeout=DEFAULT_TIMEOUT)
        return _Reload(ok, text)
    res = await conn.run(h.reload, timeout=DEFAULT_TIMEOUT)
    return _Reload(res.exit_status == 0, result_text(res)[-2000:])


def _start_action(run: HostRun, service: Service | None) -> int | None:
    """The planned, not yet run START_SERVICE action of ``service``."""
    if service is None:
        return None
    for i in run.indices({ActionKind.START_SERVICE}):
        t = run.plan.actions[i].target
        if isinstance(t, Service) and t.name == service.name:
            return i
    return None


async def start_down(run: HostRun) -> None:
    """A declared service that is down while a reload of its handler is planned is started on
    its LIVE (old) files before anything new is swapped in. Then the reload that follows is a
    real reload, proven by its probe, and a config that breaks the service is caught and
    rolled back; without this, "not running: nothing to reload" would let new files go live
    unproven. If it does not start on the old files either, that is reported, and the reload
    step starts it on the new files instead (validated, then proven by that start; on failure
    the old files are put back). Not when the service's package is installed by this apply
    (there are no old files of ours to protect: the reload step starts it and proves it)."""
    reloading = {
        a.handler
        for a in run.plan.actions
        if a.kind is ActionKind.RELOAD and a.handler and a.handler not in run.failed_handlers
    }
    for name in sorted(reloading):
        service = _service_of(run, name)
        i = _start_action(run, service)
        if service is None or i is None or run.plan.actions[i].after_package:
            continue
        started = await _start_and_prove(run, name, service)
        if started.ok:
            before = "started on its live configuration before the new one was swapped in"
            run.mark(i, "done", f"{before}; {started.text}")
            continue
        run.down_on_old.add(name)
        run.messages.append(
            f"service {service.name} was down and does not start on its live configuration either "
            f"({started.text}); the new configuration is started instead once validated, and its "
            "old files are put back if that fails too"
        )


async def reloads_phase(run: HostRun) -> None:
    for i in run.indices({ActionKind.RELOAD}):
        a = run.plan.actions[i]
        name = a.handler
        assert name is not None
        if name in run.failed_handlers:
            run.mark(i, "skipped", "its changes did not apply: nothing reloaded")
            continue
        service = _service_of(run, name)
        first = await _reload_once(run, name)
        if run.journal is not None:
            run.journal.discard(name)  # the reload ran: no longer pending, whatever its outcome
        if first.ok:
            run.reloaded.append(name)
            run.mark(i, "done", first.text)
            start = _start_action(run, service) if first.started else None
            if start is not None:
                run.mark(start, "done", f"started on the new configuration; {first.text}")
            continue
        restore_text = await restore_handler(run, name)
        again = await _reload_once(run, name)
        if again.ok and again.down:
            after = "the service is not running any more (it has no declared service to start)"
        elif again.ok and again.started:
            after = f"{service.name if service else name} was started again on them ({again.text})"
        elif again.ok:
            after = "reloaded with the old files"
        elif again.started:
            after = f"{service.name if service else name} does not start on them either: {again.text}"
        else:
            after = f"reload with the old files failed too: {again.text}"
        what = "start" if first.started else "reload"
        msg = f"{what} of {name} failed: {first.text}; its files were restored and {after}"
        if restore_text:
            msg += f" ({restore_text})"
        run.mark(i, "failed", msg)
        run.messages.append(msg)
        run.failed_handlers.add(name)
        start = _start_action(run, service)
        if start is not None:
            run.mark(start, "done" if again.ok and again.started else "failed", after)
        # The new files broke a service that ran (or started) on the old ones: terminal for
        # this commit. A service that was down and started on neither: its cause may lie
        # outside the config (a port taken, a full disk): retried with backoff.
        if name in run.down_on_old:
            run.fail(Reason.SERVICE_FAILED, msg)
        else:
            run.fail(Reason.RELOAD_BROKE_SERVICE, msg)


async def stop_replaced(run: HostRun) -> None:
    """Services this host no longer runs (the old IPsec stack) stop before the new stack's
    files go live: the old and the new stack never hold the host's policies at once, and the
    gap between them is this apply's swap."""
    idx = run.indices({ActionKind.STOP_SERVICE})
    if not idx:
        return
    conn = await run.conn()
    for i in idx:
        s = run.plan.actions[i].target
        assert isinstance(s, Service)
        outcome = await service_manager.stop_service(conn, s, run.plan.init_system)
        run.mark(i, "done" if outcome.ok else "failed", outcome.message)
        if not outcome.ok:
            run.messages.append(f"service {s.name}: {outcome.message}")


async def services_phase(run: HostRun) -> None:
    todo = planned(run, {ActionKind.START_SERVICE, ActionKind.ENABLE_SERVICE}, Service)
    if not todo:
        return
    conn = await run.conn()
    for i, a, s in todo:
        if a.kind is ActionKind.ENABLE_SERVICE:
            outcome = await service_manager.enable_service(conn, s, run.plan.init_system)
        else:
            outcome = await service_manager.start_service(conn, s, run.plan.init_system)
        run.mark(i, "done" if outcome.ok else "failed", outcome.message)
        if not outcome.ok:
            run.messages.append(f"service {s.name}: {outcome.message}")
