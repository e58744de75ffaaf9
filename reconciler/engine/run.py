"""The state of one host's apply, shared by its phases (``reconciler.engine.apply`` runs them in
order; ``transaction``, ``validate``, ``reloads``, ``finish`` and the kinds' apply steps record
outcomes here), and the names of the temps a transaction leaves next to a target."""

from __future__ import annotations

import posixpath
import secrets
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from reconciler.engine.plan import INTERRUPTED
from reconciler.errors import Failure, Reason
from reconciler.host import pathsafe
from reconciler.host.pathsafe import Batch, Rule, Status, rule_of
from reconciler.host.script import Conn, Pool
from reconciler.host.script import Result as _Result
from reconciler.host.script import result_text as result_text
from reconciler.host.state import PENDING_RELOADS_PATH as PENDING_RELOADS_PATH  # the one definition
from reconciler.kinds.actions import (
    FILES_ONLY_KINDS,
    Action,
    ActionKind,
    HostPlan,
)
from reconciler.kinds.observed import FileState
from reconciler.kinds.resources import (
    Desired,
)
from reconciler.log import get_logger

log = get_logger(__name__)

DEFAULT_TIMEOUT = 120.0
# root-only copies of staged files whose directory a non-root user controls, for their own
# validators (``{path}``): the temp next to the target could be swapped for a link
VALIDATE_DIR = "/var/lib/reconciler/validate"


@dataclass(frozen=True)
class ActionOutcome:
    action: Action
    status: str  # "done", "failed", "skipped" (not run), "n/a" (cannot apply here, e.g. no ipip)
    message: str = ""

    def as_dict(self) -> dict[str, object]:
        return {**self.action.as_dict(), "status": self.status, "message": self.message}


def staged_path(path: str, token: str) -> str:
    """``/etc/apache2/sites-available/.shop.conf.reconciler-<token>``: a dotfile whose name no
    include glob (``*.conf``, apparmor.d's non-dot files) can load."""
    d, base = posixpath.split(path)
    return posixpath.join(d, f".{base}.reconciler-{token}")


def backup_path(path: str, token: str) -> str:
    d, base = posixpath.split(path)
    return posixpath.join(d, f".{base}.reconciler-bak-{token}")


q = shlex.quote


class HostRun:
    """The state of one host's apply."""

    def __init__(self, pool: Pool, host: str, plan: HostPlan, desired: Desired, token: str) -> None:
        self.pool = pool
        self.host = host
        self.plan = plan
        self.desired = desired
        self.token = token
        self.outcomes: dict[int, ActionOutcome] = {}
        self.messages: list[str] = []
        self.reloaded: list[str] = []
        self.rolled_back = False
        self.stopped: str | None = None  # why the remaining actions were skipped
        self.failed_handlers: set[str] = set()
        self.swapped: dict[int, bool] = {}  # action index -> had a backup
        # the pending-reloads journal: handlers swapped in (or left over from an interrupted
        # apply) whose reload has not run yet; None = this apply never touched the journal
        self.journal: set[str] | None = None
        interrupted = {
            a.handler
            for a in plan.actions
            if a.kind is ActionKind.RELOAD and a.handler and INTERRUPTED in a.reason
        }
        if interrupted:
            self.journal = set(interrupted)
        self.transient: list[str] = []
        # the written files read back by the script that swapped them (see files_phase), when that
        # read is all the re-observation needs; and whether a finish script ran after it
        self.read_back: dict[str, FileState] | None = None
        self.finished = False
        # why this apply failed, typed, in the order the failures happened (see _failure)
        self.failures: list[Failure] = []
        # declared services found down that did not start on their live files (start_down)
        self.down_on_old: set[str] = set()
        self.staged_ids: dict[int, str] = {}  # action index -> "dev:ino" of its staged temp

    def fail(self, reason: Reason, message: str) -> None:
        self.failures.append(Failure(reason, message))

    def mark(self, idx: int, status: str, message: str = "") -> None:
        self.outcomes[idx] = ActionOutcome(self.plan.actions[idx], status, message)

    def indices(self, kinds: frozenset[ActionKind] | set[ActionKind]) -> list[int]:
        return [i for i, a in enumerate(self.plan.actions) if a.kind in kinds and i not in self.outcomes]

    async def conn(self) -> Conn:
        return await self.pool.get(self.host)


# ---------------------------------------------------------------- re-observation

# Actions whose whole effect is the content, mode or owner of declared files (no handler
# reload, no service, no firewall, no package: those come with their own actions).
SCOPED_REOBSERVE_KINDS = FILES_ONLY_KINDS


def reobserve_scope(plan: HostPlan, desired: Desired, outcomes: Iterable[ActionOutcome]) -> Desired | None:
    """The part of ``desired`` to observe again after an apply, or None for all of it.

    When every action of the plan ran and only wrote declared files (and the inventory), the
    rest of the host is what the plan's own observation saw a moment ago: reading iptables,
    swanctl, services and packages again would prove nothing new. Then only those files (and
    the inventory and reload journal, always read) are observed again."""
    outs = list(outcomes)
    if plan.observed is None or len(outs) != len(plan.actions):
        return None
    if any(o.status != "done" or o.action.kind not in SCOPED_REOBSERVE_KINDS for o in outs):
        return None
    paths = {o.action.path for o in outs if o.action.kind is not ActionKind.RECORD_INVENTORY}
    files = tuple(f for f in desired.files if f.path in paths)
    if len(files) != len(paths):
        return None  # something other than a declared file (e.g. the persistent ruleset)
    return Desired(host=desired.host, files=files)


def read_back_paths(run: HostRun) -> list[str] | None:
    """The files to read back in the swapping script: only when, if every action succeeds, the
    re-observation reads nothing else (``reobserve_scope``) and no finish script will run after
    it (no handler, hence no backups; the inventory unchanged)."""
    plan, seen = run.plan, run.plan.observed
    if seen is None or seen.errors or run.journal is not None:
        return None
    if any(a.kind not in SCOPED_REOBSERVE_KINDS or a.handler for a in plan.actions):
        return None
    if any(a.kind is ActionKind.RECORD_INVENTORY for a in plan.actions):
        return None
    if tuple(sorted(seen.inventory)) != plan.inventory:
        return None
    assumed = [ActionOutcome(a, "done") for a in plan.actions]
    scope = reobserve_scope(plan, run.desired, assumed)
    return [f.path for f in scope.files] if scope is not None else None


def action_rule(a: Action) -> Rule:
    """Who may control the directories above an action's path (the fleet's controlled_dir)."""
    return rule_of(a.target)


def new_batch(run: HostRun) -> Batch:
    b = Batch()
    b.token(run.token)
    return b


async def run_helper(run: HostRun, batch: Batch) -> tuple[_Result, list[Status], str]:
    """Run the path-safety helper (reconciler.host.pathsafe) with ``batch`` on the host."""
    marker = secrets.token_hex(16)
    conn = await run.conn()
    res = await conn.run(pathsafe.command(), stdin=batch.payload(marker), timeout=DEFAULT_TIMEOUT)
    return res, pathsafe.statuses(res.stdout, marker), marker
