"""What a user asks the reconciler to do, once, for the CLI (commands/) and the daemon (daemon/).

    plan            observe and plan hosts; nothing changes          engine.fleet.plan_fleet
    apply_planned   apply exactly the plans shown                     engine.fleet.apply_planned
    reconcile_host  plan and apply one host (the daemon's step)       engine.fleet.reconcile_fleet
    drift_scan      /etc snapshot -> history -> drift mail, then the history pushed to its remote
    verify          live proof of hosts                               verify.verify_fleet

The callers keep only what is theirs: argument parsing and printing (commands/), queues,
retries, status and metrics (daemon/). Both get the same behaviour, e.g. the history push:
``reconciler drift --history-remote`` and the daemon's ``history_remote`` both go through
``drift_scan`` (a push failure is reported, never a failed scan).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.drift.history import HistoryRepo
from reconciler.drift.history_branches import BRANCHES_MAIN
from reconciler.drift.scan import DriftScanner, EnforceCallback, HostDrift
from reconciler.engine import fleet as engine
from reconciler.engine.deadman import DEFAULT_WINDOW
from reconciler.errors import ReconcilerError
from reconciler.fleet.model import Fleet, Host
from reconciler.host.script import Pool
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger
from reconciler.notify.outbox import Outbox
from reconciler.verify import VerifyOptions, VerifyReport, verify_fleet

log = get_logger(__name__)

Adopt = engine.Adopt

# ---------------------------------------------------------------- plan / apply


async def plan(
    fleet: Fleet,
    hosts: Iterable[str] | None,
    pool: Pool,
    *,
    progress: engine.Progress | None = None,
    adopt: Adopt = False,
) -> engine.FleetResult:
    """Observe and plan; runs no mutating command."""
    return await engine.plan_fleet(fleet, hosts, pool, progress=progress, adopt=adopt)


async def apply_planned(
    planned: engine.FleetResult,
    pool: Pool,
    *,
    progress: engine.Progress | None = None,
    firewall_window: float = DEFAULT_WINDOW,
) -> engine.FleetResult:
    """Apply exactly the plans of ``planned`` (what the user saw and accepted)."""
    return await engine.apply_planned(planned, pool, progress=progress, firewall_window=firewall_window)


async def reconcile_host(
    fleet: Fleet,
    host: str,
    pool: Pool,
    *,
    apply: bool,
    adopt: bool = False,
    firewall_window: float = DEFAULT_WINDOW,
    fetch_diffs: bool = True,
) -> engine.HostOutcome:
    """Plan one host and, with ``apply``, apply its plan right away. ``fetch_diffs``: read the
    contents of changed files for diffs (a second round trip, only when something differs)."""
    result = await engine.reconcile_fleet(
        fleet, [host], pool, apply=apply, fetch_diffs=fetch_diffs, adopt=adopt,
        firewall_window=firewall_window,
    )  # fmt: skip
    return result.hosts[0]


# ---------------------------------------------------------------- drift


def enforce_with_engine(fleet: Fleet, pool: Pool) -> EnforceCallback:
    """Drift mode ``enforce`` in the CLI: the engine puts managed files back (plan + apply)."""

    async def enforce(host: str, paths: Sequence[str]) -> object:
        res = await engine.reconcile_fleet(fleet, [host], pool, apply=True)
        for out in res.hosts:
            if out.error:
                raise ReconcilerError(out.error)
        return res

    return enforce


async def engine_follows(host: str, paths: Sequence[str]) -> str:
    """Drift mode ``enforce`` in the daemon: its engine step reconciles the host right after
    the scan, so nothing to do here; the alert says who puts the files back."""
    return "the engine's reconcile that follows this scan puts it back"


class HistoryPush:
    """Pushes the history repo to its remote after scans that recorded something. Concurrent
    requests coalesce: at most one push runs, and one more follows if a commit landed meanwhile.
    A failed push is logged and kept in ``error`` (the next commit tries again); never raised."""

    def __init__(self, history: HistoryRepo, on_error: Callable[[str], None] | None = None) -> None:
        self.history = history
        self.error: str | None = None
        self.pushes = 0
        self._on_error = on_error
        self._lock = asyncio.Lock()
        self._requested = 0
        self._covered = 0

    async def __call__(self) -> str | None:
        """Push now (or be covered by a push that starts after this call); returns the error
        of that push, if any."""
        if not self.history.remote:
            return None
        self._requested += 1
        mine = self._requested
        async with self._lock:
            if self._covered >= mine:
                return self.error  # a push that started after this request has run
            upto = self._requested
            try:
                await self.history.push()
            except ReconcilerError as err:
                self.error = str(err)
                log.warning("history push failed", error=self.error)
                if self._on_error is not None:
                    self._on_error(self.error)
            else:
                self.error = None
                self.pushes += 1
            self._covered = upto
            return self.error


@dataclass(frozen=True)
class DriftRun:
    hosts: tuple[HostDrift, ...]
    push_error: str | None = None
    pushed: bool = False


@dataclass
class Drift:
    """What a drift scan writes to: the history repo (and its remote), the outbox, the state dir."""

    history: HistoryRepo
    outbox: Outbox | None
    state_dir: Path
    push: HistoryPush

    @classmethod
    def open(
        cls,
        state_dir: Path,
        history_dir: Path | None = None,
        *,
        remote: str | None = None,
        branches: str = BRANCHES_MAIN,
        outbox: Outbox | None = None,
        on_push_error: Callable[[str], None] | None = None,
    ) -> Drift:
        history = HistoryRepo.open(
            history_dir or state_dir / "history", state_dir, remote=remote or None, branches=branches
        )
        box = outbox if outbox is not None else Outbox.in_state_dir(state_dir)
        return cls(history, box, state_dir, HistoryPush(history, on_push_error))


def _scanner(
    drift: Drift,
    fleet: Fleet,
    fleet_commit: str | None,
    enforce: EnforceCallback | None,
    render: Callable[[Fleet, Host], Desired] | None,
) -> DriftScanner:
    return DriftScanner(
        fleet, drift.history, drift.outbox, drift.state_dir,
        fleet_commit=fleet_commit, enforce=enforce, render=render,
    )  # fmt: skip


async def _push(drift: Drift, results: Sequence[HostDrift], always: bool) -> tuple[str | None, bool]:
    """Push when a scan recorded a commit, the last push failed, or ``always`` (the CLI)."""
    wanted = always or drift.push.error is not None or any(r.commit for r in results)
    if not drift.history.remote or not wanted:
        return None, False
    error = await drift.push()
    return error, error is None


async def drift_scan(
    drift: Drift,
    fleet: Fleet,
    pool: Pool,
    hosts: Sequence[str],
    *,
    fleet_commit: str | None,
    enforce: EnforceCallback | None = None,
    render: Callable[[Fleet, Host], Desired] | None = None,
    push_always: bool = False,
) -> DriftRun:
    """Scan ``hosts`` concurrently (a failed host is reported in its result and never stops
    the others), then push the history to its remote."""
    results = tuple(await _scanner(drift, fleet, fleet_commit, enforce, render).scan(pool, hosts))
    error, pushed = await _push(drift, results, push_always)
    return DriftRun(results, error, pushed)


async def drift_scan_host(
    drift: Drift,
    fleet: Fleet,
    pool: Pool,
    host: str,
    *,
    fleet_commit: str | None,
    enforce: EnforceCallback | None = None,
    render: Callable[[Fleet, Host], Desired] | None = None,
) -> HostDrift:
    """One host (the daemon's step): a failure raises (the daemon's loop retries it, by its
    class); the history is pushed to its remote like ``drift_scan`` does."""
    scanner = _scanner(drift, fleet, fleet_commit, enforce, render)
    result = await scanner.scan_host(await pool.get(host))
    await _push(drift, (result,), False)
    return result


# ---------------------------------------------------------------- verify


async def verify(
    fleet: Fleet, hosts: Sequence[str] | None, pool: Pool, *, options: VerifyOptions
) -> VerifyReport:
    """Prove hosts live (read-only)."""
    return await verify_fleet(fleet, hosts, pool, options=options)
