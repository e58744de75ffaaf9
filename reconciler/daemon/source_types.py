"""What the fleet source tells the daemon: the source's state after a refresh, a refused commit
(and why), an admin's rollback, and the source's errors (transient git failures, terminal trust
refusals)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from reconciler.errors import Terminal, Transient
from reconciler.fleet.model import Fleet


class SourceError(Transient):
    """git failed (network, server, timeout): retried with backoff."""


class SourceTrustError(Terminal):
    """A move of the good commit that trust does not allow (a bug if it is ever raised)."""


@dataclass(frozen=True)
class Rejection:
    """A commit that will not be applied, and why. ``kind`` is a stable word for mail keys."""

    commit: str  # the refused head
    # unsigned | bad-signature | untrusted-key | wrong-signature-kind | rollback | invalid-fleet
    # | render-limit | bad-config
    kind: str
    reason: str  # one line for status and mail; names the offending commit
    good: str = ""  # the commit hosts stay on

    @property
    def key(self) -> str:
        """The idempotency key: one mail per bad commit and reason."""
        return f"source:{self.commit}:{self.kind}"


@dataclass(frozen=True)
class SourceState:
    head: str  # the branch head as fetched ("" if never fetched)
    good: str  # the commit hosts converge to ("" if none yet)
    fleet: Fleet | None  # the fleet loaded at ``good`` (None if none yet)
    rejection: Rejection | None  # why ``head`` is not used, if it is not
    changed: bool  # ``good`` moved in this refresh


@dataclass(frozen=True)
class Refusal:
    """Why a verified commit cannot be used (its fleet does not load, or the vet hook refused)."""

    kind: str
    reason: str


Vet = Callable[[str, Fleet], Awaitable[Refusal | None]]


class RollbackRefused(Terminal):
    """An explicit rollback that is not allowed (not on the branch, does not verify...)."""


@dataclass(frozen=True)
class Rollback:
    """An admin moved the good commit back on purpose."""

    commit: str  # the new good commit (older than the previous one)
    previous: str  # the good commit before
    head: str  # the fetched branch head at that moment
