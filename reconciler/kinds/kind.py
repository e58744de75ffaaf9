"""What a kind of resource provides to the engine (see ``reconciler.kinds.registry``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from reconciler.host.script import Conn, Runner, ScriptBuilder
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Handler


class SectionReader(Protocol):
    """The text of one section of the observation (``frame <id> ...``), or None when it is
    missing, cut short or failed (the reason is then in ``Observed.errors``)."""

    def __call__(
        self, sid: str, what: str, *, required: bool = True, ok: tuple[int, ...] = (0,)
    ) -> str | None: ...


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


class Kind(Protocol):
    name: str

    def wanted(self, desired: Desired) -> bool: ...
    def probe(self, desired: Desired, b: ScriptBuilder) -> None: ...
    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed: ...
    def plan(self, desired: Desired, observed: Observed) -> Sequence[Action]: ...
    async def apply(self, run: ApplyRun) -> None: ...


class ReloadProbe(Protocol):
    """A handler's own proof that a reload or a start took (e.g. Apache's new worker
    generation): the engine runs it instead of the bare reload command."""

    name: str

    def handles(self, h: Handler) -> bool: ...
    async def reload_proven(
        self, conn: Runner, argv: Sequence[str], *, timeout: float
    ) -> tuple[bool, str]: ...
    async def prove_started(self, conn: Runner, *, timeout: float) -> tuple[bool, str]: ...
