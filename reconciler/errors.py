"""One small error hierarchy.

``Terminal`` errors come from bad input (a fleet that does not validate, a refused host key):
retrying cannot help, the daemon waits for a new commit. ``Transient`` errors (network, a
locked dpkg, an SMTP outage) are retried with backoff. Every error carries a user-facing
message that never contains a secret.
"""

from __future__ import annotations

from dataclasses import dataclass


class ReconcilerError(Exception):
    """Base class; ``str(err)`` is the user-facing message."""


class Terminal(ReconcilerError):
    """Bad input or a refusal: stop until something (a commit, a key) changes."""


class Transient(ReconcilerError):
    """A failure that may go away: retry with backoff."""


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

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RenderError(Terminal):
    """Rendering refused the fleet (e.g. a ruleset that would lock out management SSH)."""


class HostKeyRefused(Terminal):
    """A host presented an unknown or changed SSH host key."""
