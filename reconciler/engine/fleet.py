"""reconcile_fleet: load -> render -> connect -> observe -> plan [-> apply -> re-observe -> verify].

Many hosts run concurrently; one failed host (bad render, unreachable, refused key, failed
apply) never stops the others: its outcome carries the error. Used by ``reconciler plan``,
``reconciler apply`` and the daemon.

``plan_fleet`` only observes: every connection it uses is wrapped in a ``RecordingConnection``
that keeps a log of the commands it ran (tests assert that plan mutates nothing).
``apply_planned`` runs the SAME plan values ``plan_fleet`` returned (what the user confirmed).

Host identity (``reconciler.engine.identity``): every host is planned with this fleet's claim on it; a
host that claims another fleet or host name is an ``error`` outcome carrying
``IdentityMismatch`` (nothing is planned or applied on it) unless ``adopt`` names it.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from reconciler.domains.render import render_host
from reconciler.engine import deadman
from reconciler.engine.apply import ApplyResult, apply_host
from reconciler.engine.identity import claim_for
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.errors import Failure, IdentityMismatch, Reason, ReconcilerError, RenderError, Terminal
from reconciler.fleet.model import Fleet
from reconciler.host.connection import Connection
from reconciler.host.script import Conn, Pool, Result
from reconciler.kinds import aptsim
from reconciler.kinds.actions import ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Package
from reconciler.log import get_logger

log = get_logger(__name__)

# statuses
IN_SYNC = "in-sync"  # plan: nothing to do
CHANGES = "changes"  # plan: changes pending
APPLIED = "applied"  # apply: done and verified
FAILED = "failed"  # apply: something failed (see result)
ERROR = "error"  # could not render / connect / observe
PARTLY_APPLIED = (
    "partly applied"  # an outcome word (HostOutcome.outcome), not a status: FAILED with changes landed
)
EXIT_PARTIAL = 3  # apply: some hosts partly applied (and none failed outright)

Progress = Callable[["HostOutcome"], None]
# hosts that may be taken over from another fleet / host name: True (all), False or names
Adopt = bool | Collection[str]


@dataclass(frozen=True)
class CommandRecord:
    host: str
    kind: str  # "run" or "script"
    text: str  # argv joined, or the script
    args: tuple[str, ...] = ()
    stdin_bytes: int = 0


class RecordingConnection:
    """Wraps a Connection and records every command (used in plan mode, and by tests)."""

    def __init__(self, conn: Conn, log_: list[CommandRecord]) -> None:
        self._conn = conn
        self.host: str = conn.host
        self.records = log_

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> Result:
        self.records.append(CommandRecord(self.host, "run", " ".join(argv), (), len(stdin or b"")))
        return await self._conn.run(argv, stdin=stdin, timeout=timeout)

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> Result:
        self.records.append(CommandRecord(self.host, "script", script, tuple(args), len(stdin_after or b"")))
        return await self._conn.run_script(script, args=args, stdin_after=stdin_after, timeout=timeout)

    async def close(self) -> None:
        await self._conn.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@dataclass(frozen=True)
class HostOutcome:
    host: str
    status: str
    plan: HostPlan | None = None
    desired: Desired | None = field(default=None, compare=False, repr=False)
    result: ApplyResult | None = None
    error: str | None = None
    seconds: float = 0.0
    # why the host failed (status ERROR or FAILED), typed: terminal or transient by its reason
    failure: Failure | None = None

    @property
    def partial(self) -> bool:
        """Failed, but some of its changes landed (the others failed or were held back)."""
        return self.status == FAILED and self.result is not None and self.result.partial

    @property
    def outcome(self) -> str:
        """The word a user reads: applied, partly applied, failed, in sync, changes, error."""
        if self.partial:
            return PARTLY_APPLIED
        return {IN_SYNC: "in sync"}.get(self.status, self.status)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "host": self.host,
            "status": self.status,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 3),
        }
        if self.partial and self.result is not None:
            out["changes_applied"], out["changes_total"] = self.result.change_counts()
        if self.error:
            out["error"] = self.error
        if self.failure is not None:
            out["reason"] = str(self.failure.reason)
            out["terminal"] = self.failure.terminal
        if self.plan is not None:
            out["plan"] = self.plan.as_dict()
        if self.result is not None:
            out["result"] = self.result.as_dict()
        return out


@dataclass(frozen=True)
class FleetResult:
    hosts: tuple[HostOutcome, ...]
    commands: tuple[CommandRecord, ...] = field(default=(), compare=False, repr=False)
    seconds: float = 0.0

    def plans(self) -> list[HostPlan]:
        return [h.plan for h in self.hosts if h.plan is not None]

    def exit_code(self) -> int:
        """0 in sync / applied, 1 any error or failure, 3 some hosts only partly applied (apply;
        no host failed outright), 2 changes pending (plan)."""
        if any(h.status == ERROR or (h.status == FAILED and not h.partial) for h in self.hosts):
            return 1
        if any(h.partial for h in self.hosts):
            return EXIT_PARTIAL
        if any(h.status == CHANGES for h in self.hosts):
            return 2
        return 0

    def as_dict(self) -> dict[str, object]:
        return {"hosts": [h.as_dict() for h in self.hosts], "exit_code": self.exit_code()}


# Rendering is pure and deterministic, so a host's Desired is computed once per Fleet object
# (the daemon keeps one Fleet per verified commit and reconciles its hosts again and again).
# Keyed by id() (a Fleet holds mappings: it is not hashable) and dropped with the Fleet.
# A bounded render (reconciler.domains.bounded_render) seeds the results of every host, render errors
# included; such a fleet is never rendered in this process.
@dataclass
class _Rendered:
    ref: weakref.ref[Fleet]
    hosts: dict[str, Desired | RenderError] = field(default_factory=dict)
    sealed: bool = False  # seeded by a bounded render: never render here


_RENDERED: dict[int, _Rendered] = {}


def _rendered(fleet: Fleet) -> _Rendered:
    key = id(fleet)
    entry = _RENDERED.get(key)
    if entry is None or entry.ref() is not fleet:
        entry = _Rendered(weakref.ref(fleet, lambda _r, k=key: _RENDERED.pop(k, None)))  # type: ignore[misc]
        _RENDERED[key] = entry
    return entry


def seed_rendered(fleet: Fleet, rendered: Mapping[str, Desired | RenderError]) -> None:
    """Use these results (from a bounded render) for ``fleet``; its hosts are never rendered
    in this process (a host missing from them is a render error)."""
    entry = _rendered(fleet)
    entry.hosts.update(rendered)
    entry.sealed = True


def render_cached(fleet: Fleet, name: str) -> Desired:
    entry = _rendered(fleet)
    desired = entry.hosts.get(name)
    if desired is None:
        if entry.sealed:
            raise RenderError(f"host {name}: not rendered for this commit")
        desired = render_host(fleet, fleet.host(name))
        entry.hosts[name] = desired
    if isinstance(desired, RenderError):
        raise RenderError(str(desired))
    return desired


def select_hosts(fleet: Fleet, hosts: Iterable[str] | None) -> list[str]:
    """The host names to work on (all when ``hosts`` is empty); unknown names are an error."""
    names = list(fleet.host_names())
    if not hosts:
        return names
    wanted = list(dict.fromkeys(hosts))
    unknown = [h for h in wanted if h not in names]
    if unknown:
        raise ReconcilerError(f"unknown host(s): {', '.join(unknown)} (fleet has: {', '.join(names)})")
    return wanted


def _adopts(adopt: Adopt, name: str) -> bool:
    return adopt if isinstance(adopt, bool) else name in adopt


async def _plan_one(
    fleet: Fleet,
    name: str,
    pool: Pool,
    records: list[CommandRecord] | None,
    *,
    fetch_diffs: bool = True,
    adopt: Adopt = False,
) -> HostOutcome:
    started = time.monotonic()
    try:
        desired = render_cached(fleet, name)
    except ReconcilerError as err:
        failure = Failure(err.reason, f"render: {err}")
        return HostOutcome(
            name, ERROR, error=failure.message, seconds=time.monotonic() - started, failure=failure
        )
    try:
        conn = await pool.get(name)
        if records is not None:
            conn = RecordingConnection(conn, records)
        observed = await observe_host(cast(Connection, conn), desired, fetch_diffs=fetch_diffs)
        plan = plan_host(desired, observed, claim_for(fleet, name), adopt=_adopts(adopt, name))
        if not plan.refusal and not plan.errors and _package_names(plan) != ((), ()):
            # packages change: ask apt for its solution (one read-only round trip), plan again
            installs, purges = _package_names(plan)
            sim = await aptsim.simulate(conn, installs, purges)
            observed = replace(observed, apt=sim)
            plan = plan_host(desired, observed, claim_for(fleet, name), adopt=_adopts(adopt, name))
    except ReconcilerError as err:
        return HostOutcome(
            name,
            ERROR,
            desired=desired,
            error=str(err),
            seconds=time.monotonic() - started,
            failure=Failure.of(err),
        )
    except Exception as err:  # a bug must not stop the other hosts
        log.exception("plan.crash", host=name)
        failure = Failure.of(err)
        return HostOutcome(
            name,
            ERROR,
            desired=desired,
            error=failure.message,
            seconds=time.monotonic() - started,
            failure=failure,
        )
    if plan.refusal:
        target = getattr(conn, "target", None)
        address = getattr(target, "address", None) or str(fleet.host(name).public_address)
        refused: Terminal = IdentityMismatch(f"{name} ({address}) {plan.refusal}")
        if plan.refused_requirement:
            refused = Terminal(f"{name} ({address}): {plan.refusal}", reason=Reason.REFUSED)
        log.warning("plan.refused", host=name, reason=plan.refusal)
        return HostOutcome(
            name,
            ERROR,
            desired=desired,
            error=str(refused),
            seconds=time.monotonic() - started,
            failure=Failure.of(refused),
        )
    status = CHANGES if plan.changed else IN_SYNC
    if plan.errors:
        status = ERROR
        message = "cannot plan completely (nothing applied on this host): " + "; ".join(plan.errors)
        return HostOutcome(
            name,
            status,
            plan,
            desired,
            error=message,
            seconds=time.monotonic() - started,
            failure=Failure(Reason.OBSERVE_INCOMPLETE, message),
        )
    return HostOutcome(name, status, plan, desired, seconds=time.monotonic() - started)


def _package_names(plan: HostPlan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The packages the plan installs and purges."""
    names: dict[ActionKind, list[str]] = {ActionKind.INSTALL_PACKAGE: [], ActionKind.PURGE_PACKAGE: []}
    for a in plan.actions:
        if a.kind in names and isinstance(a.target, Package):
            names[a.kind].append(a.target.name)
    return tuple(names[ActionKind.INSTALL_PACKAGE]), tuple(names[ActionKind.PURGE_PACKAGE])


async def plan_fleet(
    fleet: Fleet,
    hosts: Iterable[str] | None,
    pool: Pool,
    *,
    progress: Progress | None = None,
    record: bool = True,
    adopt: Adopt = False,
) -> FleetResult:
    """Observe and plan every selected host concurrently; nothing is changed on any host.
    ``adopt``: plan to take over hosts that claim another fleet or host name (all or names)."""
    started = time.monotonic()
    names = select_hosts(fleet, hosts)
    records: list[CommandRecord] | None = [] if record else None

    async def one(name: str) -> HostOutcome:
        out = await _plan_one(fleet, name, pool, records, adopt=adopt)
        if progress is not None:
            progress(out)
        return out

    outs = await asyncio.gather(*(one(n) for n in names))
    return FleetResult(tuple(outs), tuple(records or ()), time.monotonic() - started)


async def _apply_one(outcome: HostOutcome, pool: Pool, firewall_window: float) -> HostOutcome:
    if outcome.status != CHANGES or outcome.plan is None or outcome.desired is None:
        return outcome
    started = time.monotonic()
    try:
        result = await apply_host(
            pool, outcome.host, outcome.plan, outcome.desired, firewall_window=firewall_window
        )
    except Exception as err:
        log.exception("apply.crash", host=outcome.host)
        crash = Failure.of(err)
        return replace(
            outcome,
            status=FAILED,
            error=crash.message,
            seconds=outcome.seconds + time.monotonic() - started,
            failure=crash,
        )
    status = APPLIED if result.ok else FAILED
    error = None if result.ok else "; ".join(result.messages[-3:]) or "apply failed"
    if result.partial:
        done, total = result.change_counts()
        failed = "; ".join(
            f"{o.action.kind} {o.action.resource}: {o.message.splitlines()[0] if o.message else o.status}"
            for o in result.outcomes
            if o.status == "failed"
        )
        error = f"partly applied: {done} of {total} changes; failed: {failed or 'see messages'}; {error}"
    failure: Failure | None = None
    if not result.ok:
        # the apply's typed reason, with the user-facing summary as its message
        reason = result.failure.reason if result.failure is not None else Reason.APPLY_FAILED
        failure = Failure(reason, error or "apply failed")
    return replace(
        outcome,
        status=status,
        result=result,
        error=error,
        seconds=outcome.seconds + time.monotonic() - started,
        failure=failure,
    )


async def apply_planned(
    planned: FleetResult,
    pool: Pool,
    *,
    progress: Progress | None = None,
    firewall_window: float = deadman.DEFAULT_WINDOW,
) -> FleetResult:
    """Apply the plans of ``planned`` (exactly those values) on their hosts, concurrently."""
    started = time.monotonic()

    async def one(o: HostOutcome) -> HostOutcome:
        out = await _apply_one(o, pool, firewall_window)
        if progress is not None and o.status == CHANGES:
            progress(out)
        return out

    outs = await asyncio.gather(*(one(o) for o in planned.hosts))
    return FleetResult(tuple(outs), planned.commands, planned.seconds + time.monotonic() - started)


async def reconcile_fleet(
    fleet: Fleet,
    hosts: Iterable[str] | None,
    pool: Pool,
    *,
    apply: bool,
    progress: Progress | None = None,
    firewall_window: float = deadman.DEFAULT_WINDOW,
    fetch_diffs: bool = True,
    adopt: Adopt = False,
) -> FleetResult:
    """Plan every selected host and, with ``apply``, apply each host's plan right away
    (a host starts applying as soon as its own plan is ready). ``fetch_diffs=False`` skips the
    second observation round trip that reads changed files for diffs (the daemon shows none).
    ``adopt``: take over hosts that claim another fleet or host name (all, or these names)."""
    started = time.monotonic()
    names = select_hosts(fleet, hosts)

    async def one(name: str) -> HostOutcome:
        out = await _plan_one(fleet, name, pool, None, fetch_diffs=fetch_diffs, adopt=adopt)
        if apply:
            out = await _apply_one(out, pool, firewall_window)
        if progress is not None:
            progress(out)
        return out

    outs = await asyncio.gather(*(one(n) for n in names))
    return FleetResult(tuple(outs), (), time.monotonic() - started)
