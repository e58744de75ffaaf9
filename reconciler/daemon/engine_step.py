"""The daemon's reconcile step for one host: the plan/apply use case, its outcome for the loop.

A failed host raises the error its typed failure stands for (Terminal or Transient by its
reason), which the loop (loop.py) acts on; a change or an apply comes back as an ``Outcome`` with
the plan as the status page shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler import usecases
from reconciler.daemon.records import plan_record
from reconciler.daemon.step import Outcome, Target
from reconciler.engine import fleet as engine
from reconciler.engine.deadman import DEFAULT_WINDOW
from reconciler.errors import Failure, Reason
from reconciler.host.connection import ConnectionPool
from reconciler.kinds.resources import Domain


@dataclass(frozen=True)
class EngineStep:
    outcome: Outcome
    domains: frozenset[Domain] = frozenset()  # what the apply changed (for verify after apply)
    plan: dict[str, Any] | None = None  # the plan as the status page shows it (records.plan_record)


async def engine_step(
    host: str,
    target: Target,
    pool: ConnectionPool,
    *,
    apply: bool,
    firewall_window: float = DEFAULT_WINDOW,
    adopt: bool = False,
) -> EngineStep:
    """One host through reconciler.engine.fleet.reconcile_fleet. A failed host raises the error its
    outcome's typed failure stands for (Terminal or Transient by its reason; loop.py acts on it).
    ``adopt``: take the host over when it claims another fleet or host name (config ``adopt``);
    otherwise that is a Terminal refusal (reason ``identity-mismatch``)."""
    out = await usecases.reconcile_host(
        target.fleet, host, pool, apply=apply, adopt=adopt, firewall_window=firewall_window,
        fetch_diffs=True,  # for the status page's last plan: read only when something differs
    )  # fmt: skip
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
