"""One small error hierarchy, and the typed reasons a host fails for.

``Terminal`` errors come from bad input or a refusal (a fleet that does not validate, a refused
host key, a config that broke its service at reload, a firewall change the dead-man switch
rolled back): retrying the same commit cannot help, the daemon waits for a new commit (or an
explicit ``reconciler sync``). ``Transient`` errors (network, a locked dpkg, a timeout) are
retried with backoff. Every error carries a user-facing message that never contains a secret,
and a ``Reason``: a short code (``firewall-rolled-back``, ``unreachable``, ...) that names why,
travels unchanged from where the failure happened to the daemon's status, metrics and mail, and
decides terminal or transient. Nothing downstream guesses the class back from a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a host did not converge. ``terminal`` says whether retrying the same commit can help."""

    # terminal: wait for a new commit (or an explicit sync)
    FLEET_INVALID = "fleet-invalid"  # the fleet repo did not validate
    RENDER_REFUSED = "render-refused"  # rendering refused the fleet for this host
    HOST_KEY_REFUSED = "host-key-refused"  # unknown or changed SSH host key
    AUTH_REFUSED = "auth-refused"  # the host refused our credentials
    IDENTITY_MISMATCH = "identity-mismatch"  # the host is not the one the fleet names
    VALIDATION_FAILED = "validation-failed"  # a validator refused the new files: nothing swapped
    FIREWALL_ROLLED_BACK = "firewall-rolled-back"  # the dead-man switch restored the old rules
    RELOAD_BROKE_SERVICE = "reload-broke-service"  # the new config broke its service: restored
    REFUSED = "refused"  # another refusal
    # transient: retried with backoff
    UNREACHABLE = "unreachable"  # cannot connect
    TIMEOUT = "timeout"  # a command did not finish in time
    CONNECTION_LOST = "connection-lost"  # the connection dropped mid-command
    DPKG_LOCKED = "dpkg-locked"  # another process holds the dpkg lock
    HOST_LOCKED = "host-locked"  # another apply holds the host's apply lock (engine/hostlock.py)
    OBSERVE_INCOMPLETE = "observe-incomplete"  # part of the observation failed: nothing applied
    PACKAGE_FAILED = "package-failed"  # apt/dpkg failed (a mirror may be down)
    SERVICE_FAILED = "service-failed"  # a declared service did not start
    NOT_CONVERGED = "not-converged"  # applied, but the host still differs when observed again
    APPLY_FAILED = "apply-failed"  # another apply failure (staging, swap, a tunnel...)
    FAILED = "failed"  # another failure of ours
    INTERNAL_ERROR = "internal-error"  # a bug: logged with its traceback, retried

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        Reason.FLEET_INVALID,
        Reason.RENDER_REFUSED,
        Reason.HOST_KEY_REFUSED,
        Reason.AUTH_REFUSED,
        Reason.IDENTITY_MISMATCH,
        Reason.VALIDATION_FAILED,
        Reason.FIREWALL_ROLLED_BACK,
        Reason.RELOAD_BROKE_SERVICE,
        Reason.REFUSED,
    }
)


class ReconcilerError(Exception):
    """Base class; ``str(err)`` is the user-facing message, ``err.reason`` the typed reason.

    A subclass sets ``reason`` as a class attribute; ``reason=`` on the constructor overrides it.
    """

    reason: Reason = Reason.FAILED

    def __init__(self, *args: object, reason: Reason | None = None) -> None:
        super().__init__(*args)
        if reason is not None:
            self.reason = reason


class Terminal(ReconcilerError):
    """Bad input or a refusal: stop until something (a commit, a key) changes."""

    reason = Reason.REFUSED

    def __init__(self, *args: object, reason: Reason | None = None) -> None:
        if reason is not None and not reason.terminal:
            raise ValueError(f"Terminal error with the transient reason {reason}")
        super().__init__(*args, reason=reason)


class Transient(ReconcilerError):
    """A failure that may go away: retry with backoff."""

    reason = Reason.APPLY_FAILED

    def __init__(self, *args: object, reason: Reason | None = None) -> None:
        if reason is not None and reason.terminal:
            raise ValueError(f"Transient error with the terminal reason {reason}")
        super().__init__(*args, reason=reason)


@dataclass(frozen=True)
class Failure:
    """A host's failure as a value: the reason (which decides terminal or transient) and the
    user-facing message. Kept by the engine's per-host outcome and the apply result."""

    reason: Reason
    message: str

    @property
    def terminal(self) -> bool:
        return self.reason.terminal

    def error(self) -> ReconcilerError:
        """The exception that carries this failure (Terminal or Transient by its reason)."""
        if self.terminal:
            return Terminal(self.message, reason=self.reason)
        return Transient(self.message, reason=self.reason)

    @classmethod
    def of(cls, err: BaseException) -> Failure:
        """The failure an exception stands for: ours keep their reason; anything else is a bug
        (shown by type only: its text may hold anything)."""
        if isinstance(err, ReconcilerError):
            return cls(err.reason, str(err) or type(err).__name__)
        if isinstance(err, TimeoutError):
            return cls(Reason.TIMEOUT, "timed out")
        return cls(Reason.INTERNAL_ERROR, f"internal error: {type(err).__name__}: {err}")


def pick_failure(failures: list[Failure] | tuple[Failure, ...]) -> Failure | None:
    """The failure that decides a host's outcome: the first terminal one (the commit cannot
    apply on this host; retrying would repeat it), else the first one."""
    for f in failures:
        if f.terminal:
            return f
    return failures[0] if failures else None


@dataclass(frozen=True, order=True)
class Problem:
    """One validation finding, located in the fleet repo.

    ``file`` is relative to the repo root; ``line``/``col`` are 1-based (0 when unknown);
    ``field`` is a dotted path such as ``mesh.proposals.ike[0]``.
    """

    file: str
    line: int
    col: int
    field: str
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        field = f" {self.field}:" if self.field else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}:{field} {prefix}{self.message}"


class FleetInvalid(Terminal):
    """The fleet repo did not validate; ``problems`` lists every error found."""

    reason = Reason.FLEET_INVALID

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RenderError(Terminal):
    """Rendering refused the fleet (e.g. a ruleset that would lock out management SSH)."""

    reason = Reason.RENDER_REFUSED


class HostKeyRefused(Terminal):
    """A host presented an unknown or changed SSH host key."""

    reason = Reason.HOST_KEY_REFUSED


class IdentityMismatch(Terminal):
    """The host answering at an address is not the host the fleet names there: its
    /etc/reconciler/identity claims another fleet or another host name. Nothing is changed on it
    until a new commit, or until it is taken over with ``--adopt``."""

    reason = Reason.IDENTITY_MISMATCH
