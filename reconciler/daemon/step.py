"""The reconcile loop's contract with its steps: what a step works on (``Target``), what it
reports (``Outcome``), what a failed one becomes (``HostFailure``) and the message shown for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from reconciler.errors import Failure, ReconcilerError
from reconciler.fleet.model import Fleet


@dataclass(frozen=True)
class Target:
    """What hosts converge to: a verified, loaded commit."""

    commit: str
    fleet: Fleet
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What the reconcile step reports for one host."""

    applied: bool = True  # False: observed/planned only (plan mode), nothing was changed
    reason: str = ""  # short human summary ("no changes", "3 changes applied")
    drift: int = 0  # drift findings in this pass
    changes: int = 0  # changes applied in this pass


ReconcileStep = Callable[[str, Target, frozenset[str]], Awaitable[Outcome | None]]
RefreshStep = Callable[[], Awaitable[Target | None]]
ScanStep = Callable[[str, Target], Awaitable[int]]  # drift scan only (a stalled host): findings


@dataclass(frozen=True)
class HostFailure:
    """One failed reconcile, as the loop hands it to ``on_failure``."""

    host: str
    commit: str
    failure: Failure
    retry_in: float | None  # seconds until the retry; None when terminal (stalled)
    failures: int  # consecutive failures of this host

    @property
    def terminal(self) -> bool:
        return self.retry_in is None


def user_message(exc: BaseException) -> str:
    """The message shown in status and events: ours are user-facing; others only by type."""
    if isinstance(exc, ReconcilerError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"internal error ({type(exc).__name__}); see the daemon log"
