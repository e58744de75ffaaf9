"""What the daemon records for the status page: a host's last plan, its drift log, its mails.

Small, secret-free JSON kept in the store (``Store.set_record``): a plan's actions with their
diffs (the engine masks secret files' diffs; each diff is cut to ``MAX_DIFF`` characters), the
last drift findings with their /etc history commits, never a file's content otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.daemon.store import JsonObject, JsonValue
from reconciler.drift.scan import DriftFinding
from reconciler.kinds.actions import HostPlan

MAX_DIFF = 6000
MAX_ACTIONS = 200
MAX_DRIFT_LOG = 20


@dataclass(frozen=True)
class DriftSeen:
    """One daemon drift scan's hand edits (``reconciler.drift.scan.DriftFinding`` or a count)."""

    count: int
    history_commit: str = ""
    paths: tuple[str, ...] = ()

    @classmethod
    def of(cls, found: DriftFinding | int) -> DriftSeen:
        if isinstance(found, int):
            return cls(found)
        return cls(int(found.count), str(found.history_commit or ""), tuple(found.paths))

    def message(self) -> str:
        shown = ", ".join(self.paths[:5]) + (", ..." if self.count > 5 else "")
        where = f" (history {self.history_commit[:12]})" if self.history_commit else ""
        return (
            f"{self.count} path(s) edited by hand: {shown}{where}"
            if shown
            else f"{self.count} path(s) edited by hand{where}"
        )

    def as_json(self, at: float, commit: str) -> JsonObject:
        return {"at": at, "count": self.count, "history_commit": self.history_commit,
                "paths": list(self.paths), "fleet_commit": commit}  # fmt: skip


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DIFF else text[:MAX_DIFF] + "\n... (cut)"


def plan_record(plan: HostPlan | None, *, commit: str, applied: bool, summary: str) -> dict[str, Any]:
    """The last plan of a host as the host page shows it."""
    actions = [] if plan is None else [
        {"kind": str(a.kind), "resource": a.resource, "reason": a.reason, "diff": _cut(a.diff)}
        for a in plan.actions[:MAX_ACTIONS]
    ]  # fmt: skip
    return {
        "commit": commit,
        "applied": applied,
        "summary": summary,
        "actions": actions,
        "more_actions": max(0, len(plan.actions) - MAX_ACTIONS) if plan is not None else 0,
        "pending": [f"{p.subject}: {p.reason}" for p in plan.pending] if plan is not None else [],
        "skipped": [f"{p.subject}: {p.reason}" for p in plan.skipped] if plan is not None else [],
        "warnings": list(plan.warnings) if plan is not None else [],
    }


def add_drift(log: JsonValue, entry: JsonObject) -> list[JsonValue]:
    """The drift log with ``entry`` first (``log``: the stored one, a list or nothing yet)."""
    out: list[JsonValue] = [entry]
    out += log if isinstance(log, list) else []
    return out[:MAX_DRIFT_LOG]
