"""What a kind of resource provides to the engine (see ``reconciler.kinds.registry``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from reconciler.host.script import Conn, Runner, ScriptBuilder, Section
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Handler, Pending


class SectionReader(Protocol):
    """The text of one section of the observation (``frame <id> ...``), or None when it is
    missing, cut short or failed (the reason is then in ``Observed.errors``)."""

    def __call__(
        self, sid: str, what: str, *, required: bool = True, ok: tuple[int, ...] = (0,)
    ) -> str | None: ...

    def section(self, sid: str) -> Section | None:
        """The raw section (bytes, exit status, stderr), for a kind that judges them itself."""
        ...

    def error(self, message: str) -> None:
        """Report a part of the observation that failed (``Observed.errors``, in kind order)."""
        ...


@dataclass(frozen=True)
class PlanStep:
    """What a kind's ``plan`` sees: the Desired as declared, the same with only the resources
    whose package will be there once the plan's package actions ran (``kept``: the engine's
    simulated post-install state), the observation, and the plan's errors, warnings and skipped
    resources (a kind appends to them)."""

    desired: Desired
    kept: Desired
    observed: Observed
    errors: list[str]
    warnings: list[str]
    skipped: list[Pending]


class ApplyRun(Protocol):
    """What a kind's ``apply`` sees of one host's apply (``reconciler.engine.apply``)."""

    @property
    def plan(self) -> HostPlan: ...
    @property
    def reloaded(self) -> list[str]: ...
    @property
    def failed_handlers(self) -> set[str]: ...
    @property
    def messages(self) -> list[str]: ...

    def indices(self, kinds: frozenset[ActionKind] | set[ActionKind]) -> list[int]: ...
    def mark(self, idx: int, status: str, message: str = "") -> None: ...
    async def conn(self) -> Conn: ...


T = TypeVar("T")


def planned(run: ApplyRun, kinds: set[ActionKind], target: type[T]) -> list[tuple[int, Action, T]]:
    """The plan's actions of ``kinds`` with their index and target (each a ``target``)."""
    out: list[tuple[int, Action, T]] = []
    for i in run.indices(kinds):
        a = run.plan.actions[i]
        assert isinstance(a.target, target), (a.kind, a.target)
        out.append((i, a, a.target))
    return out


class Kind(Protocol):
    name: str
    # shell functions the kind's probe calls, part of the observation script's prelude
    shell: str

    def wanted(self, desired: Desired) -> bool: ...
    def probe(self, desired: Desired, b: ScriptBuilder) -> None: ...
    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed: ...
    def plan(self, step: PlanStep) -> Sequence[Action]: ...
    async def apply(self, run: ApplyRun) -> None: ...


class BaseKind:
    """Defaults for a kind that has only some of the parts (no probe, no diff, or an apply
    that is still one of the engine's phases)."""

    name = ""
    shell = ""

    def wanted(self, desired: Desired) -> bool:
        return False

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        return None

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        return observed

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return ()

    async def apply(self, run: ApplyRun) -> None:
        return None


def first_error(stderr: str) -> str:
    """The first line of a probe's stderr that is not strongSwan's plugin noise."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "plugin" not in ln]
    return (useful or lines or [""])[0][:300]


class ReloadProbe(Protocol):
    """A handler's own proof that a reload or a start took (e.g. Apache's new worker
    generation): the engine runs it instead of the bare reload command."""

    name: str

    def handles(self, h: Handler) -> bool: ...
    async def reload_proven(
        self, conn: Runner, argv: Sequence[str], *, timeout: float
    ) -> tuple[bool, str]: ...
    async def prove_started(self, conn: Runner, *, timeout: float) -> tuple[bool, str]: ...
