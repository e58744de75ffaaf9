"""Run a HostPlan on its host: stage, validate, swap, reload, re-observe, verify.

Phases (each one SSH round trip, in this order):

1. packages: ``apt-get install``/``purge`` for the planned packages (``reconciler.kinds.packaging``:
   non-interactive, under a timeout, never waiting for a dpkg lock held by another process:
   that is reported and retried later). Everything that needs a package that did not install
   (its files, links, key pairs, services, and the other changes of the same handlers) is not
   applied and is reported with the package's apt/dpkg output; the rest still applies. Running
   first means validators a package brings (``apache2ctl``, ``apparmor_parser``) exist when
   the files phase validates;
2. firewall: ``reconciler.engine.deadman`` (save, arm a rollback, load, confirm over a NEW connection);
   a failure stops the host here (everything after depends on reachability and IKE/ESP);
3. key pairs: generated on the host when the private key is missing (never read back);
4. files: **stage** every new file/link as a dotfile temp next to its target
   (``<dir>/.<name>.reconciler-<token>``, a tar on stdin; stale temps of earlier runs are
   removed), **validate** (file validators on the staged file, handler validators on a staged
   copy of their whole tree with every pending change applied), then **swap** (backup as a hard
   link, chown/chmod the temp, ``mv -T`` over the target; deletes keep a backup too). On any
   validation failure the staged temps are removed, live files stay, nothing reloads;
5. tunnels (``ip link add ... type ipip``; a kernel without ipip is reported as a skip);
6. reloads: each affected handler once, after all its files are swapped, proven by a probe
   (Apache); a handler whose declared service is down starts it and proves it instead of
   skipping. On failure its files are restored from the backups and it is reloaded again with
   the old files, or its service started again on them when the reload killed it. (A declared
   service that is down while its handler reloads is started on the live files before step 4.)
7. services enabled and started when not running (``systemctl enable --now`` where PID 1 is
   systemd, else ``update-rc.d NAME defaults`` + the service's start command); a service that
   fails to start is reported with the last lines of its log;
8. backups removed, the inventory (``/var/lib/reconciler/inventory.json``) written, then the
   host identity (``/etc/reconciler/identity``) when the plan records it: both only when every
   action succeeded, the identity never without the inventory;
9. observe again and plan again: the result must be empty (``converged``).

A failed apply keeps WHY, typed (``ApplyResult.failure``, a ``reconciler.errors.Reason``): the
first terminal failure (firewall rolled back, validation refused, reload broke the service),
else the first transient one.

The SSH connection dropping at any point never leaves a half-written file: content only ever
reaches a live path by ``rename``.
"""

from __future__ import annotations

import posixpath
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import cast

from reconciler.engine import deadman
from reconciler.engine.identity import IDENTITY_PATH, format_identity
from reconciler.engine.observe import observe_host, parse_read_back, read_back
from reconciler.engine.plan import INTERRUPTED, INVENTORY_PATH, inventory_json, plan_host, tunnel_addresses
from reconciler.errors import Failure, Reason, ReconcilerError, pick_failure
from reconciler.host import pathsafe
from reconciler.host.connection import Connection
from reconciler.host.pathsafe import STRICT, Batch, Rule, Status, rule_of
from reconciler.host.script import Conn, Pool
from reconciler.host.script import Result as _Result
from reconciler.kinds import packaging
from reconciler.kinds.actions import (
    FILE_KINDS,
    FILES_ONLY_KINDS,
    SETTLING_KINDS,
    Action,
    ActionKind,
    HostPlan,
)
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.registry import KINDS, probe_for
from reconciler.kinds.resources import (
    Address,
    Desired,
    FileResource,
    FirewallRuleset,
    KeyPair,
    LinkResource,
    Package,
    Service,
    Tunnel,
    Validator,
)
from reconciler.log import get_logger

log = get_logger(__name__)

DEFAULT_TIMEOUT = 120.0
# handlers whose files are live but not yet reloaded; observe reads it (Observed.pending_reloads)
PENDING_RELOADS_PATH = "/var/lib/reconciler/pending-reloads"
# Fault injection for tests only: awaited with the host name right after the swap, before any
# reload (a test kills the SSH session there). Never set in production code.
FAULT_AFTER_SWAP: Callable[[str], Awaitable[None]] | None = None
# ... and right before the swap round trip (staging, if any, done in a round trip of its own):
# a test races the host's other users there (links swapped in after the observation)
FAULT_BEFORE_SWAP: Callable[[str], Awaitable[None]] | None = None
# root-only copies of staged files whose directory a non-root user controls, for their own
# validators (``{path}``): the temp next to the target could be swapped for a link
VALIDATE_DIR = "/var/lib/reconciler/validate"
PROBE_WAIT = 15.0  # seconds a post-reload probe waits for the new configuration to be live


@dataclass(frozen=True)
class ActionOutcome:
    action: Action
    status: str  # "done", "failed", "skipped" (not run), "n/a" (cannot apply here, e.g. no ipip)
    message: str = ""

    def as_dict(self) -> dict[str, object]:
        return {**self.action.as_dict(), "status": self.status, "message": self.message}


@dataclass(frozen=True)
class ApplyResult:
    host: str
    ok: bool
    outcomes: tuple[ActionOutcome, ...] = ()
    reloaded: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()  # validator output, rollbacks, skips: what a user must read
    rolled_back: bool = False
    verify: HostPlan | None = field(default=None, compare=False)  # the plan after re-observing
    converged: bool = False
    seconds: float = 0.0
    transient: tuple[str, ...] = ()  # failures that go away by themselves (a dpkg lock): retry later
    # why the apply failed, typed (terminal or transient by its reason); None when ok
    failure: Failure | None = None

    def changed(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "done" and o.action.kind is not ActionKind.RELOAD)

    def applied(self) -> tuple[str, ...]:
        """What this apply changed on the host (reloads included)."""
        return tuple(f"{o.action.kind} {o.action.resource}" for o in self.outcomes if o.status == "done")

    def not_applied(self) -> tuple[str, ...]:
        """What was attempted but failed, or held back because something it depends on failed."""
        return tuple(
            f"{o.action.kind} {o.action.resource}" for o in self.outcomes if o.status in ("failed", "skipped")
        )

    @property
    def partial(self) -> bool:
        """Some changes applied, others failed or were held back (independent ones still ran)."""
        return not self.ok and bool(self.applied()) and bool(self.not_applied())

    def as_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "ok": self.ok,
            "converged": self.converged,
            "rolled_back": self.rolled_back,
            "reloaded": list(self.reloaded),
            "messages": list(self.messages),
            "partial": self.partial,
            "applied": list(self.applied()),
            "not_applied": list(self.not_applied()),
            "outcomes": [o.as_dict() for o in self.outcomes],
            "remaining": [a.as_dict() for a in self.verify.actions] if self.verify else [],
            "seconds": round(self.seconds, 3),
            "transient": list(self.transient),
            "failure": None
            if self.failure is None
            else {"reason": str(self.failure.reason), "terminal": self.failure.terminal},
        }


def staged_path(path: str, token: str) -> str:
    """``/etc/apache2/sites-available/.shop.conf.reconciler-<token>``: a dotfile whose name no
    include glob (``*.conf``, apparmor.d's non-dot files) can load."""
    d, base = posixpath.split(path)
    return posixpath.join(d, f".{base}.reconciler-{token}")


def backup_path(path: str, token: str) -> str:
    d, base = posixpath.split(path)
    return posixpath.join(d, f".{base}.reconciler-bak-{token}")


q = shlex.quote


class _Run:
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
        # the written files read back by the script that swapped them (see _files), when that
        # read is all the re-observation needs; and whether a finish script ran after it
        self.read_back: dict[str, FileState] | None = None
        self.finished = False
        # why this apply failed, typed, in the order the failures happened (see _failure)
        self.failures: list[Failure] = []
        # declared services found down that did not start on their live files (_start_down)
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


async def apply_host(
    conn_pool: Pool,
    host: str,
    plan: HostPlan,
    desired: Desired,
    *,
    firewall_window: float = deadman.DEFAULT_WINDOW,
    verify: bool = True,
) -> ApplyResult:
    """Run ``plan`` (the value ``plan_host`` returned) on ``host``; never raises for host errors."""
    started = time.monotonic()
    if not plan.actions:
        return ApplyResult(host, True, messages=(plan.noop_reason,), converged=True, verify=plan)
    run = _Run(conn_pool, host, plan, desired, secrets.token_hex(6))
    phase = "start"
    try:
        phase = "packages"
        await _packages(run)
        phase = "firewall"
        await _firewall(run, firewall_window)
        if run.stopped is None:
            phase = "key pairs"
            await _keypairs(run)
            phase = "services down before the swap"
            await _start_down(run)
            phase = "files"
            await _files(run)
            if FAULT_AFTER_SWAP is not None:
                await FAULT_AFTER_SWAP(host)
            phase = "tunnels"
            await _tunnels(run)
            await _addresses(run)
            phase = "reloads"
            await _reloads(run)
            for kind in KINDS:
                phase = kind.name
                await kind.apply(run)
            phase = "services"
            await _services(run)
            phase = "ipsec children"
            await _initiate(run)
            phase = "finish"
            await _finish(run)
    except ReconcilerError as err:
        run.stopped = f"{phase}: {err}"
        run.fail(err.reason, f"apply stopped during {phase}: {err}")
        run.messages.append(
            f"apply stopped during {phase}: {err}; live files were only ever replaced by rename "
            "(no half-written file); the next apply removes staged temps and converges"
        )
    for i in range(len(plan.actions)):
        if i not in run.outcomes:
            run.mark(i, "skipped", run.stopped or "not run")

    verify_plan: HostPlan | None = None
    if verify and not run.rolled_back:
        try:
            conn = await run.conn()
            observed = await reobserve(cast(Connection, conn), run)
            verify_plan = plan_host(desired, observed, plan.identity)
        except ReconcilerError as err:
            run.messages.append(f"could not observe the host again to verify: {err}")
    if verify_plan is not None and verify_plan.refusal:
        run.messages.append(f"the host's identity does not match after the apply: {verify_plan.refusal}")
    converged = (
        verify_plan is not None
        and not verify_plan.refusal
        and not [a for a in verify_plan.actions if a.kind not in SETTLING_KINDS]
    )
    ok = all(o.status in ("done", "n/a") for o in run.outcomes.values()) and not run.rolled_back
    if ok and verify and not converged:
        left = ", ".join(
            f"{a.kind} {a.resource}"
            for a in (verify_plan.actions if verify_plan else ())
            if a.kind not in SETTLING_KINDS
        )
        run.messages.append(f"applied, but the host still differs after re-observing: {left or 'unknown'}")
        ok = False
    for reason in run.transient:
        run.messages.append(f"will retry later: {reason}")
    outcomes = tuple(run.outcomes[i] for i in range(len(plan.actions)))
    failure = None if ok else _failure(run, outcomes, verify_plan is not None and converged)
    log.info(
        "apply.done", host=host, ok=ok, converged=converged, seconds=round(time.monotonic() - started, 3)
    )
    return ApplyResult(
        host=host,
        ok=ok,
        outcomes=outcomes,
        reloaded=tuple(run.reloaded),
        messages=tuple(run.messages),
        rolled_back=run.rolled_back,
        verify=verify_plan,
        converged=converged,
        seconds=time.monotonic() - started,
        transient=tuple(dict.fromkeys(run.transient)),
        failure=failure,
    )


def _failure(run: _Run, outcomes: tuple[ActionOutcome, ...], converged: bool) -> Failure:
    """Why a failed apply failed, typed: the failures its phases recorded (a validator that
    refused, a reload that broke its service, the connection lost...), the firewall rolled back
    by the dead-man switch, a dpkg lock, a package or service that failed; the first terminal
    one decides (``errors.pick_failure``), else the first one."""
    found: list[Failure] = []
    last = "; ".join(run.messages[-3:]) or "apply failed"
    if run.rolled_back:
        found.append(Failure(Reason.FIREWALL_ROLLED_BACK, last))
    found += run.failures
    found += [Failure(Reason.DPKG_LOCKED, lock) for lock in run.transient]
    package_kinds = (ActionKind.INSTALL_PACKAGE, ActionKind.PURGE_PACKAGE)
    for o in outcomes:
        if o.status == "failed" and o.action.kind in package_kinds:
            found.append(Failure(Reason.PACKAGE_FAILED, f"{o.action.resource}: {o.message}"))
        elif o.status == "failed" and o.action.kind is ActionKind.START_SERVICE:
            found.append(Failure(Reason.SERVICE_FAILED, f"{o.action.resource}: {o.message}"))
    if not found and not converged and all(o.status in ("done", "n/a") for o in outcomes):
        found.append(Failure(Reason.NOT_CONVERGED, last))
    picked = pick_failure(found)
    return picked if picked is not None else Failure(Reason.APPLY_FAILED, last)


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


def _read_back_paths(run: _Run) -> list[str] | None:
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


async def reobserve(conn: Connection, run: _Run) -> Observed:
    """Observe the host again after the apply: all of it, or only what the apply wrote merged
    into the plan's observation (``reobserve_scope``)."""
    scope = reobserve_scope(run.plan, run.desired, run.outcomes.values())
    if scope is None or run.plan.observed is None:
        return await observe_host(conn, run.desired)
    before = run.plan.observed
    wrote = {f.path for f in scope.files}
    if run.read_back is not None and set(run.read_back) == wrote and not run.finished:
        # read by the swapping script itself, after the renames; the inventory and the reload
        # journal were not touched (no finish script ran)
        files = {**before.files, **run.read_back}
        return replace(before, files=MappingProxyType(dict(sorted(files.items()))), errors=())
    fresh = await observe_host(conn, scope, fetch_diffs=False, stat_inventory=False)
    files = dict(before.files)
    files.update(fresh.files)
    return replace(
        before,
        files=MappingProxyType(dict(sorted(files.items()))),
        inventory=fresh.inventory,
        pending_reloads=fresh.pending_reloads,
        identity=fresh.identity,
        errors=fresh.errors,
    )


def _text(res: _Result) -> str:
    return (res.stderr + res.stdout).decode(errors="replace").strip()


# ---------------------------------------------------------------- packages


async def _packages(run: _Run) -> None:
    idx = run.indices({ActionKind.INSTALL_PACKAGE, ActionKind.PURGE_PACKAGE})
    if not idx:
        return
    conn = await run.conn()
    failed: dict[str, str] = {}
    for kind, verb in ((ActionKind.INSTALL_PACKAGE, "install"), (ActionKind.PURGE_PACKAGE, "purge")):
        group: dict[str, int] = {}
        for i in idx:
            target = run.plan.actions[i].target
            if run.plan.actions[i].kind is kind and isinstance(target, Package):
                group[target.name] = i
        if not group:
            continue
        result = await packaging.apt(conn, verb, list(group))
        if result.transient and result.lock is not None:
            run.transient.append(result.lock.message())
        why = dict(result.failed)
        for name, i in group.items():
            if name in why:
                run.mark(i, "failed", why[name])
                failed[name] = why[name]
            else:
                run.mark(i, "done", "installed" if verb == "install" else "purged")
        if not result.ok:
            run.messages.append(result.summary())
    if failed:
        _hold_dependents(run, failed)


def _hold_dependents(run: _Run, failed: dict[str, str]) -> None:
    """Skip every action that needs a package that did not install, and the other changes of
    the handlers they belong to (a handler's tree is validated and reloaded as a whole)."""
    held: dict[str, str] = {}  # handler -> package
    names: dict[str, list[str]] = {}
    actions = run.plan.actions
    for i, a in enumerate(actions):
        if i in run.outcomes:
            continue
        pkg = getattr(a.target, "needs_package", None) or a.after_package
        if pkg in failed:
            assert pkg is not None
            run.mark(i, "skipped", f"not applied: package {pkg} did not install")
            names.setdefault(pkg, []).append(a.resource)
            if a.handler:
                held.setdefault(a.handler, pkg)
    for i, a in enumerate(actions):
        if i in run.outcomes or a.kind is ActionKind.RELOAD or a.handler not in held:
            continue
        pkg = held[a.handler or ""]
        run.mark(i, "skipped", f"not applied: the other changes for {a.handler} wait for package {pkg}")
        names.setdefault(pkg, []).append(a.resource)
    run.failed_handlers.update(held)
    for pkg, resources in names.items():
        run.messages.append(
            f"package {pkg} did not install: {len(resources)} dependent change(s) not applied "
            f"(live files untouched): {', '.join(resources)}"
        )


# ---------------------------------------------------------------- firewall


async def _firewall(run: _Run, window: float) -> None:
    idx = run.indices({ActionKind.RESTORE_FIREWALL})
    for i in idx:
        fw = run.plan.actions[i].target
        assert isinstance(fw, FirewallRuleset)
        outcome = await deadman.apply_firewall(run.pool, run.host, fw, token=run.token, window=window)
        run.messages.append(outcome.message)
        if outcome.ok:
            run.mark(i, "done", outcome.message)
            continue
        run.mark(i, "failed", outcome.message)
        if outcome.live_confirmed:
            # the new rules are live and SSH was proven over a new connection: only the
            # persistent file failed (reported, retried by the next apply); what follows does
            # not depend on it
            run.fail(Reason.APPLY_FAILED, outcome.message)
            continue
        if not outcome.rolled_back:  # a rollback is typed by _failure (FIREWALL_ROLLED_BACK)
            run.fail(Reason.REFUSED if outcome.refused else Reason.APPLY_FAILED, outcome.message)
        run.rolled_back = outcome.rolled_back
        run.stopped = f"the firewall change failed ({outcome.message}); later changes depend on it"
        if outcome.rolled_back:
            drop = getattr(run.pool, "drop", None)
            if drop is not None:
                await drop(run.host)


# ---------------------------------------------------------------- key pairs


async def _keypairs(run: _Run) -> None:
    idx = run.indices({ActionKind.GENERATE_KEYPAIR})
    if not idx:
        return
    lines = ["set -u", "umask 077", "log=$(mktemp) || exit 9"]
    for i in idx:
        kp = run.plan.actions[i].target
        assert isinstance(kp, KeyPair)
        cmds = " && ".join(shlex.join(argv) for argv in kp.generate) or "true"
        log_file = '"$log"'
        lines += [
            f"if [ -e {q(kp.private_path)} ]; then echo '@@K {i} exists'",
            f"elif mkdir -p {q(posixpath.dirname(kp.private_path))} {q(posixpath.dirname(kp.public_path))} "
            f"&& ( {cmds} ) >{log_file} 2>&1 && [ -e {q(kp.private_path)} ]; then",
            f"  chmod 0644 {q(kp.public_path)} 2>/dev/null; echo '@@K {i} ok'",
            f"else echo '@@K {i} failed'; cat {log_file} 2>/dev/null; fi",
        ]
    lines.append('rm -f "$log"')
    conn = await run.conn()
    res = await conn.run_script("\n".join(lines) + "\n", timeout=DEFAULT_TIMEOUT)
    out = res.stdout.decode(errors="replace")
    for i in idx:
        if f"@@K {i} ok" in out or f"@@K {i} exists" in out:
            run.mark(i, "done", "key pair generated on the host (private key never read)")
        else:
            detail = out.split(f"@@K {i} failed", 1)[-1].split("@@K ", 1)[0].strip()
            run.mark(i, "failed", f"key generation failed: {detail[-1000:]}")
            run.messages.append(f"{run.plan.actions[i].resource}: key generation failed: {detail[-1000:]}")
            h = run.plan.actions[i].handler
            if h:
                run.failed_handlers.add(h)


# ---------------------------------------------------------------- files


def _file_actions(run: _Run) -> list[int]:
    return run.indices(set(FILE_KINDS))


def _content_actions(run: _Run, idx: list[int]) -> list[int]:
    """Actions that put new content or a new link in place (staged)."""
    out = []
    for i in idx:
        a = run.plan.actions[i]
        if a.kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK):
            out.append(i)
    return out


def _rule(a: Action) -> Rule:
    """Who may control the directories above an action's path (the fleet's controlled_dir)."""
    return rule_of(a.target)


def validation_copy(path: str, token: str, idx: int) -> str:
    """Where a file's own validator reads the staged content when the file's directory is not
    root's alone: a root-only copy (the staged temp itself could be swapped for a link)."""
    return posixpath.join(VALIDATE_DIR, token, str(idx), posixpath.basename(path))


def _validated_source(run: _Run, i: int) -> str:
    a = run.plan.actions[i]
    assert a.path is not None
    if isinstance(a.target, FileResource) and not _rule(a).strict:
        return validation_copy(a.path, run.token, i)
    return staged_path(a.path, run.token)


def _batch(run: _Run) -> Batch:
    b = Batch()
    b.token(run.token)
    return b


async def _helper(run: _Run, batch: Batch) -> tuple[_Result, list[Status], str]:
    """Run the path-safety helper (reconciler.host.pathsafe) with ``batch`` on the host."""
    marker = secrets.token_hex(16)
    conn = await run.conn()
    res = await conn.run(pathsafe.command(), stdin=batch.payload(marker), timeout=DEFAULT_TIMEOUT)
    return res, pathsafe.statuses(res.stdout, marker), marker


def _stage_ops(run: _Run, b: Batch, idx: list[int], staged: list[int]) -> None:
    """Leftovers of earlier applies removed from every directory with a change (never this
    run's); then every new file/link created as a dotfile temp next to its target, owner and
    mode set on the open file."""
    actions = run.plan.actions
    dirs: dict[str, int] = {}
    for i in idx:
        dirs.setdefault(posixpath.dirname(actions[i].path or "/"), i)
    staged_dirs = {posixpath.dirname(actions[i].path or "/") for i in staged}
    for d, i in dirs.items():
        if d not in staged_dirs:  # (staging cleans its own directories)
            b.clean(actions[i].path or "/", _rule(actions[i]), keep_token=True)
    for i in staged:
        a = actions[i]
        t = a.target
        assert a.path is not None
        if isinstance(t, FileResource):
            copy = validation_copy(a.path, run.token, i) if t.validators and not _rule(a).strict else ""
            b.stage(
                i,
                a.path,
                _rule(a),
                content=t.content,
                mode=t.mode,
                owner=t.owner,
                group=t.group,
                validation_copy=copy,
            )
        elif isinstance(t, LinkResource):
            b.stage(i, a.path, _rule(a), link_target=t.target)


async def _files(run: _Run) -> None:
    _refuse(run)
    idx = _file_actions(run)
    if not idx:
        return
    staged = _content_actions(run, idx)
    # nothing to validate between staging and swapping: both in one round trip (a test hook
    # that must run between them keeps them apart)
    combined = bool(staged) and not _needs_validation(run, idx) and FAULT_BEFORE_SWAP is None
    # when the re-observation would only read these files again, the same run reads them
    back = _read_back_paths(run) if combined else None
    if staged:
        b = _batch(run)
        _stage_ops(run, b, idx, staged)
        if combined:
            b.gate()  # a file that could not be staged: nothing swapped in this run
            _swap_ops(run, b, idx)
            if back:
                read_back(b, {p: _path_rule(run, p) for p in back})
        res, answer, marker = await _helper(run, b)
        done = {s.idx: s.text for s in answer if s.tag == "S"}
        if any(i not in done for i in staged):
            await _unstage(run, staged)
            msg = f"staging failed (exit {res.exit_status}): {_text(res)[-2000:]}"
            for i in idx:
                run.mark(i, "failed", msg)
            run.messages.append(msg)
            _fail_handlers(run, idx)
            return
        bad = {i: text.removeprefix("fail ") for i, text in done.items() if text.split(" ")[0] != "ok"}
        # the inode of each staged file: the swap refuses anything else found under its name
        run.staged_ids.update({i: text[3:] for i, text in done.items() if text.startswith("ok ")})
        if bad:
            held = _hold_back(run, idx, bad, "could not be staged")
            # a refused directory or an unknown owner found while staging (the plan saw the
            # host before it changed) is a refusal; anything else (a full disk...) may pass
            refusal = all(t.startswith(("refused: ", "unknown user", "unknown group")) for t in bad.values())
            run.fail(Reason.REFUSED if refusal else Reason.APPLY_FAILED, "; ".join(bad.values()))
            await _unstage(run, [i for i in staged if i in held])
            idx = [i for i in idx if i not in held]
            if not idx:
                return
            if combined:  # the gate kept everything back: swap the rest now
                await _swap(run, idx)
                return
        elif combined:
            _swap_outcome(run, idx, res, answer)
            if back:
                run.read_back = parse_read_back(res.stdout, back, marker)
            return
        staged = [i for i in staged if i in idx]
    # validate
    failures = await _validate(run, idx)
    if failures:
        blocked = _blocked_by(run, idx, failures)
        await _unstage(run, [i for i in staged if i in blocked])
        _report_blocked(run, idx, failures, blocked)
        idx = [i for i in idx if i not in blocked]
        if not idx:
            return
    await _swap(run, idx)


def _path_rule(run: _Run, path: str) -> Rule:
    for f in run.desired.files:
        if f.path == path:
            return rule_of(f)
    return STRICT


def _refuse(run: _Run) -> None:
    """Refused actions (the plan saw a link or another user's directory on the path, or an
    unknown owner) fail with their reason; their handlers' other changes are held back."""
    refused = run.indices({ActionKind.REFUSED})
    if refused:
        why = {i: run.plan.actions[i].reason for i in refused}
        _hold_back(run, [*refused, *_file_actions(run)], why, "refused")
        # the host's own state refuses this commit: retrying repeats it until the fleet or the
        # host changes (a new commit, or an explicit sync after the host is fixed)
        run.fail(Reason.REFUSED, "; ".join(f"{run.plan.actions[i].resource}: {why[i]}" for i in refused))


def _hold_back(run: _Run, idx: list[int], bad: dict[int, str], what: str) -> set[int]:
    """``bad`` fail with their reason; every other change of their handlers is held back (a
    handler's files are validated and reloaded as a whole; independent changes still apply).
    Returns what was held back (``bad`` included)."""
    actions = run.plan.actions
    handlers = {h for i in bad if (h := actions[i].handler)}
    held: set[int] = set()
    for i in idx:
        a = actions[i]
        if i in bad:
            run.mark(i, "failed", bad[i])
            run.messages.append(f"{a.resource}: {bad[i]}")
        elif a.handler in handlers:
            run.mark(i, "skipped", f"not applied: another change of {a.handler} {what}")
        else:
            continue
        held.add(i)
    run.failed_handlers |= handlers
    _skip_services_of_failed(run)
    return held


def _skip_services_of_failed(run: _Run) -> None:
    """A service named after a held-back handler would start on the old configuration."""
    for i in run.indices({ActionKind.START_SERVICE}):
        t = run.plan.actions[i].target
        if isinstance(t, Service) and t.name in run.failed_handlers:
            run.mark(i, "skipped", f"not started: the configuration of {t.name} did not apply")
            run.messages.append(f"service {t.name} not started: its configuration did not apply")


@dataclass(frozen=True)
class _Failure:
    """One validator that failed, and what it was validating."""

    label: str
    message: str
    handler: str | None = None  # a handler validator (its whole tree)
    action: int | None = None  # a file's own validator
    unknown: bool = False  # validation did not finish: nothing is known to be valid


def _blocked_by(run: _Run, idx: list[int], failures: list[_Failure]) -> dict[int, str]:
    """The file actions a validation failure holds back, each with the reason: the file that
    failed its own validator, every change of a handler whose validation failed (or that owns
    such a file), and every change of a handler whose validated tree holds a held-back change
    (its validation assumed that change). Independent changes are not held back."""
    actions = run.plan.actions
    if any(f.unknown for f in failures):
        return dict.fromkeys(idx, "validation did not finish")
    bad_files = {f.action for f in failures if f.action is not None}
    bad_handlers = {f.handler for f in failures if f.handler}
    bad_handlers |= {h for i in bad_files if (h := actions[i].handler)}
    while True:
        held = [i for i in idx if i in bad_files or actions[i].handler in bad_handlers]
        paths = [actions[i].path for i in held if actions[i].path]
        more = set()
        for i in idx:
            name = actions[i].handler
            if not name or name in bad_handlers:
                continue
            try:
                roots = [v.tree_root for v in run.desired.handler(name).validators if v.tree_root]
            except KeyError:
                continue
            if any(p and r and (p + "/").startswith(r.rstrip("/") + "/") for p in paths for r in roots):
                more.add(name)
        if not more:
            break
        bad_handlers |= more
    out: dict[int, str] = {}
    for i in idx:
        a = actions[i]
        if i in bad_files:
            out[i] = "its validation failed"
        elif a.handler in bad_handlers:
            out[i] = f"validation of {a.handler} failed"
    return out


def _report_blocked(run: _Run, idx: list[int], failures: list[_Failure], blocked: dict[int, str]) -> None:
    actions = run.plan.actions
    direct = {f.action for f in failures if f.action is not None}
    for i, why in blocked.items():
        run.mark(i, "failed" if i in direct or "did not finish" in why else "skipped", f"not applied: {why}")
        h = actions[i].handler
        if h:
            run.failed_handlers.add(h)
    held = [actions[i].resource for i in idx if i in blocked]
    going = [actions[i].resource for i in idx if i not in blocked]
    msg = "validation failed:\n" + "\n".join(f.message for f in failures)
    msg += f"\nnot applied (live files untouched, not reloaded): {', '.join(held)}"
    if going:
        msg += f"\nindependent changes still applied: {', '.join(going)}"
    run.messages.append(msg)
    # a validator that refused is terminal for this commit; one that did not finish is not
    unknown = any(f.unknown for f in failures)
    run.fail(Reason.APPLY_FAILED if unknown else Reason.VALIDATION_FAILED, msg)
    # services named after a held-back handler would start on the old configuration
    for i in run.indices({ActionKind.START_SERVICE}):
        t = actions[i].target
        if isinstance(t, Service) and t.name in run.failed_handlers:
            run.mark(i, "skipped", f"not started: the configuration of {t.name} did not validate")
            run.messages.append(f"service {t.name} not started: its configuration did not validate")


def _fail_handlers(run: _Run, idx: list[int]) -> None:
    for i in idx:
        h = run.plan.actions[i].handler
        if h:
            run.failed_handlers.add(h)


async def _unstage(run: _Run, staged: list[int]) -> None:
    if not staged:
        return
    b = _batch(run)
    for i in staged:
        a = run.plan.actions[i]
        b.unstage(a.path or "/", _rule(a))
    await _helper(run, b)


def _subst(text: str, *, path: str | None, tree: str | None) -> str:
    if path is not None:
        text = text.replace("{path}", path)
    if tree is not None:
        text = text.replace("{tree}", tree)
    return text


def _validator_cmd(v: Validator, *, path: str | None, tree_var: bool) -> str:
    """A shell command line for one validator: every argument quoted; ``{tree}`` becomes the
    (quoted) value of the script variable ``$tree``."""
    marker = "\x00TREE\x00"
    parts = []
    for k, val in v.env:
        parts.append(_quote_with_tree(f"{k}={_subst(val, path=path, tree=marker)}", marker))
    argv = [_quote_with_tree(_subst(a, path=path, tree=marker), marker) for a in v.argv]
    env = ("env " + " ".join(parts) + " ") if parts else ""
    del tree_var
    return env + " ".join(argv)


def _quote_with_tree(text: str, marker: str) -> str:
    pieces = text.split(marker)
    return '"$tree"'.join(q(p) if p else "" for p in pieces) or "''"


def _needs_validation(run: _Run, idx: list[int]) -> bool:
    """Whether any validator applies to these file actions (see ``_validate``)."""
    actions = run.plan.actions
    for i in idx:
        a = actions[i]
        if a.kind not in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK, ActionKind.DELETE):
            continue
        if isinstance(a.target, FileResource) and a.target.validators:
            return True
        if a.handler:
            try:
                if run.desired.handler(a.handler).validators:
                    return True
            except KeyError:
                continue
    return False


async def _validate(run: _Run, idx: list[int]) -> list[_Failure]:
    """Run every relevant validator in one round trip; return the failures."""
    actions = run.plan.actions
    changed = [i for i in idx if actions[i].kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK)]
    changed += [i for i in idx if actions[i].kind is ActionKind.DELETE]
    lines = ["set -u", "rc_all=0"]
    labels: list[str] = []
    owners: list[tuple[str | None, int | None]] = []
    mark = f"@@V-{run.token} "  # a validator's own output cannot forge it (random per apply)

    def add(label: str, body: list[str], needs: str | None, owner: tuple[str | None, int | None]) -> None:
        n = len(labels)
        labels.append(label)
        owners.append(owner)
        guard = f"command -v {q(needs)} >/dev/null 2>&1" if needs else "true"
        lines.append(f"if {guard}; then")
        lines.append("  out=$( {")
        lines.extend("    " + b for b in body)
        lines.append("  } 2>&1 ); rc=$?")
        lines.append(f"  echo '{mark}{n}' $rc; printf '%s\\n' \"$out\"")
        lines.append("else")
        lines.append(f"  echo '{mark}{n} skip'")
        lines.append("fi")

    # the files' own validators, on the staged file
    for i in changed:
        t = actions[i].target
        if isinstance(t, FileResource):
            for v in t.validators:
                sp = _validated_source(run, i)
                add(
                    f"{t.path}: {' '.join(v.argv)}",
                    [_validator_cmd(v, path=sp, tree_var=False)],
                    v.needs_command,
                    (None, i),
                )
    # handler validators on a staged copy of the whole tree
    handlers = sorted({hn for i in changed if (hn := actions[i].handler)})
    for name in handlers:
        try:
            h = run.desired.handler(name)
        except KeyError:
            continue
        for v in h.validators:
            body: list[str] = []
            if v.tree_root:
                root = v.tree_root.rstrip("/") or "/"
                body.append("tmpd=$(mktemp -d /tmp/.reconciler-tree.XXXXXX) || exit 90")
                body.append(f'tree="$tmpd"/{q(posixpath.basename(root) or "root")}')
                body.append(f'cp -a {q(root)} "$tree" 2>/dev/null || mkdir -p "$tree"')
                for i in changed:
                    a = actions[i]
                    if not a.path or not a.path.startswith(root + "/"):
                        continue
                    rel = a.path[len(root) + 1 :]
                    dst = f'"$tree"/{q(rel)}'
                    body.append(f'mkdir -p "$(dirname {dst})"')
                    if a.kind is ActionKind.DELETE:
                        body.append(f"rm -f {dst}")
                    elif isinstance(a.target, LinkResource):
                        lt = a.target.target
                        if lt.startswith(root + "/"):
                            lt_cmd = f'"$tree"/{q(lt[len(root) + 1 :])}'
                        else:
                            lt_cmd = q(lt)
                        body.append(f"rm -f {dst}; ln -s {lt_cmd} {dst}")
                    else:
                        body.append(f"rm -f {dst}; cp -p {q(_validated_source(run, i))} {dst}")
                # drop staged temps copied from the live tree: the copy must hold what will be live
                body.append("find \"$tree\" -name '.*.reconciler-*' -exec rm -f {} + 2>/dev/null")
                body.append(f"( cd / && {_validator_cmd(v, path=None, tree_var=True)} ); vrc=$?")
                body.append('rm -rf "$tmpd"; exit $vrc')
                body = ["("] + ["  " + b for b in body] + [")"]
            else:
                body.append(f"cd / && {_validator_cmd(v, path=None, tree_var=False)}")
            add(f"{name}: {' '.join(v.argv)}", body, v.needs_command, (name, None))
    if not labels:
        return []
    if any(_validated_source(run, i).startswith(VALIDATE_DIR + "/") for i in changed):
        lines.append(f"rm -rf -- {q(posixpath.join(VALIDATE_DIR, run.token))}")
    conn = await run.conn()
    res = await conn.run_script("\n".join(lines) + "\n", timeout=DEFAULT_TIMEOUT)
    out = res.stdout.decode(errors="replace")
    problems: list[_Failure] = []
    chunks = out.split(mark)[1:]
    seen = set()
    for chunk in chunks:
        head, _, body_text = chunk.partition("\n")
        parts = head.split()
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        n = int(parts[0])
        seen.add(n)
        if n >= len(labels):
            continue
        if parts[1] == "skip":
            run.messages.append(f"validator skipped ({labels[n]}): its command is not installed")
        elif parts[1] != "0":
            message = f"{labels[n]} (exit {parts[1]}):\n{body_text.strip()[-3000:]}"
            problems.append(_Failure(labels[n], message, handler=owners[n][0], action=owners[n][1]))
    if len(seen) < len(labels):
        problems.append(
            _Failure(
                "validation",
                f"validation did not finish (exit {res.exit_status}): {_text(res)[-2000:]}",
                unknown=True,
            )
        )
    return problems


async def _swap(run: _Run, idx: list[int]) -> None:
    b = _batch(run)
    _swap_ops(run, b, idx)
    if FAULT_BEFORE_SWAP is not None:
        await FAULT_BEFORE_SWAP(run.host)
    res, answer, _ = await _helper(run, b)
    _swap_outcome(run, idx, res, answer)


def _swap_ops(run: _Run, b: Batch, idx: list[int]) -> None:
    """Put the staged files live (rename inside the pinned directory), with backups of a
    handler's files; mode/owner fixes on the open file; deletes. The pending-reloads journal
    first: if it cannot be written, nothing goes live."""
    actions = run.plan.actions
    reloading = {a.handler for a in actions if a.kind is ActionKind.RELOAD and a.handler}
    touched = {h for i in idx if (h := actions[i].handler) in reloading}
    if touched:
        # written BEFORE anything goes live: if the apply is cut off before the reloads, the
        # next observation finds the handlers here and the next plan reloads them
        run.journal = (run.journal or set()) | touched
        b.journal(PENDING_RELOADS_PATH, "".join(f"{n}\n" for n in sorted(run.journal)))
    for i in idx:
        a = actions[i]
        p = a.path
        assert p is not None
        t = a.target
        rule = _rule(a)
        # a backup only where a failed reload can roll the file back: a handler's files
        backup = bool(a.handler)
        if a.kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK):
            link = t.target if isinstance(t, LinkResource) else None
            owner = t.owner if isinstance(t, FileResource) else "root"
            b.swap(i, p, rule, backup=backup, link_target=link, owner=owner, expect=run.staged_ids.get(i, ""))
        elif a.kind in (ActionKind.CHMOD, ActionKind.CHOWN) and isinstance(t, FileResource):
            chown = a.kind is ActionKind.CHOWN
            b.meta(i, p, rule, chown=chown, mode=t.mode, owner=t.owner, group=t.group)
        elif a.kind is ActionKind.DELETE:
            b.delete(i, p, rule, backup=backup)
        else:
            run.mark(i, "failed", f"nothing to do for {a.kind}")


def _swap_outcome(run: _Run, idx: list[int], res: _Result, answer: list[Status]) -> None:
    actions = run.plan.actions
    journal = next((s.text for s in answer if s.tag == "J"), "")
    for s in answer:
        if s.tag == "B":
            run.swapped[s.idx] = True
    for i in idx:
        if i in run.outcomes:
            continue
        ok = next((s for s in answer if s.idx == i and s.tag == "OK"), None)
        fail = next((s for s in answer if s.idx == i and s.tag == "F"), None)
        if ok is not None:
            run.swapped.setdefault(i, False)
            run.mark(i, "done", ok.text)
            continue
        if fail is not None:
            msg = fail.text
        elif journal:
            msg = f"not swapped: {journal}"
        else:
            msg = f"no answer (exit {res.exit_status}): {_text(res)[-500:]}"
        run.mark(i, "failed", msg)
        run.messages.append(f"{actions[i].resource}: {msg}")
        h = actions[i].handler
        if h:
            run.failed_handlers.add(h)


async def _restore(run: _Run, handler: str) -> str:
    """Put back the files of one handler from this apply's backups (created files removed)."""
    b = _batch(run)
    for i, had_backup in run.swapped.items():
        a = run.plan.actions[i]
        if a.handler != handler or a.kind in (ActionKind.CHMOD, ActionKind.CHOWN) or not a.path:
            continue
        b.restore(i, a.path, _rule(a), had_backup=had_backup)
        run.outcomes[i] = ActionOutcome(a, "failed", f"rolled back: {handler} failed to reload")
    res, answer, _ = await _helper(run, b)
    problems = [s.text for s in answer if s.tag == "RF"]
    if res.exit_status != 0:
        problems.append(f"restore exit {res.exit_status}: {res.stderr.decode(errors='replace')[-500:]}")
    return "; ".join(problems)


# ---------------------------------------------------------------- tunnels


TUNNEL_SCRIPT = r"""
# $1 name $2 local $3 remote $4 address $5 peer $6 recreate(0|1)
n=$1
if [ "$6" = 1 ]; then ip link del "$n" 2>/dev/null; fi
if ! out=$(ip link add "$n" type ipip local "$2" remote "$3" 2>&1); then
  case "$out" in
    *"Unknown device type"*|*"No such device"*) echo "@@NOIPIP $out"; exit 0;;
  esac
  echo "@@FAIL ip link add: $out"; exit 0
fi
ip addr add "$4" peer "$5" dev "$n" 2>&1 || { echo "@@FAIL ip addr add"; exit 0; }
ip link set "$n" up 2>&1 || { echo "@@FAIL ip link set up"; exit 0; }
echo "@@OK"
"""


async def _tunnels(run: _Run) -> None:
    idx = run.indices({ActionKind.CREATE_TUNNEL, ActionKind.RECREATE_TUNNEL})
    if not idx:
        return
    conn = await run.conn()
    for i in idx:
        a = run.plan.actions[i]
        t = a.target
        assert isinstance(t, Tunnel)
        local_addr, _, peer = tunnel_addresses(t)[0].partition(" peer ")
        recreate = "1" if a.kind is ActionKind.RECREATE_TUNNEL else "0"
        res = await conn.run_script(
            TUNNEL_SCRIPT, args=(t.name, t.local, t.remote, local_addr, peer, recreate), timeout=30
        )
        out = res.stdout.decode(errors="replace")
        if "@@OK" in out:
            run.mark(i, "done")
        elif "@@NOIPIP" in out:
            msg = (
                f"tunnel {t.name} skipped: the kernel has no ipip module "
                f"(ip link add type ipip: {out.split('@@NOIPIP', 1)[1].strip()})"
            )
            run.mark(i, "n/a", msg)
            run.messages.append(msg)
        else:
            run.mark(i, "failed", out.strip() or _text(res))
            run.messages.append(f"tunnel {t.name}: {out.strip() or _text(res)}")


async def _addresses(run: _Run) -> None:
    idx = run.indices({ActionKind.ADD_ADDRESS})
    if not idx:
        return
    conn = await run.conn()
    for i in idx:
        a = run.plan.actions[i].target
        assert isinstance(a, Address)
        res = await conn.run(["ip", "addr", "replace", a.address, "dev", a.interface], timeout=30)
        if res.exit_status == 0:
            run.mark(i, "done")
        else:
            run.mark(i, "failed", _text(res))
            run.messages.append(f"address {a.address} on {a.interface}: {_text(res)}")


# ---------------------------------------------------------------- reloads and services


@dataclass(frozen=True)
class _Reload:
    """What reloading one handler did."""

    ok: bool
    text: str
    started: bool = False  # its service was down: started (not reloaded) and proven
    down: bool = False  # not running, and no declared service to start: nothing reloaded


def _service_of(run: _Run, handler: str) -> Service | None:
    """The declared, wanted-running service a handler reloads (``Handler.service``)."""
    try:
        name = run.desired.handler(handler).service
    except KeyError:
        return None
    if not name:
        return None
    return next((s for s in run.desired.services if s.name == name and s.running), None)


async def _start_and_prove(run: _Run, handler: str, service: Service) -> _Reload:
    """Start a service that is down on the files that are live now, and prove it runs: the
    service's own start and status probe (``packaging.start_service``), then for Apache a live
    master with a serving worker generation that survives a second."""
    conn = await run.conn()
    started = await packaging.start_service(conn, service, run.plan.init_system)
    if not started.ok:
        return _Reload(False, started.message, started=True)
    probe = probe_for(run.desired.handler(handler))
    if probe is not None:
        ok, text = await probe.prove_started(conn, timeout=DEFAULT_TIMEOUT)
        if not ok:
            return _Reload(False, f"{service.name} started, but {text}", started=True)
        return _Reload(True, f"{started.message}; {text}", started=True)
    return _Reload(True, started.message, started=True)


async def _reload_once(run: _Run, handler: str) -> _Reload:
    h = run.desired.handler(handler)
    conn = await run.conn()
    if h.only_if_running:
        probe = await conn.run(h.only_if_running, timeout=30)
        if probe.exit_status != 0:
            service = _service_of(run, handler)
            if service is None:
                return _Reload(True, "not running: nothing to reload", down=True)
            # never "reloaded" into a service that is not running: start it on these files
            return await _start_and_prove(run, handler, service)
    if not h.reload:
        return _Reload(True, "")
    proof = probe_for(h)
    if proof is not None:
        # the handler's own proof: the new configuration must be live, not just signalled
        ok, text = await proof.reload_proven(conn, h.reload, timeout=DEFAULT_TIMEOUT)
        return _Reload(ok, text)
    res = await conn.run(h.reload, timeout=DEFAULT_TIMEOUT)
    return _Reload(res.exit_status == 0, _text(res)[-2000:])


def _start_action(run: _Run, service: Service | None) -> int | None:
    """The planned, not yet run START_SERVICE action of ``service``."""
    if service is None:
        return None
    for i in run.indices({ActionKind.START_SERVICE}):
        t = run.plan.actions[i].target
        if isinstance(t, Service) and t.name == service.name:
            return i
    return None


async def _start_down(run: _Run) -> None:
    """A declared service that is down while a reload of its handler is planned is started on
    its LIVE (old) files before anything new is swapped in. Then the reload that follows is a
    real reload, proven by its probe, and a config that breaks the service is caught and
    rolled back; without this, "not running: nothing to reload" would let new files go live
    unproven. If it does not start on the old files either, that is reported, and the reload
    step starts it on the new files instead (validated, then proven by that start; on failure
    the old files are put back). Not when the service's package is installed by this apply
    (there are no old files of ours to protect: the reload step starts it and proves it)."""
    reloading = {
        a.handler
        for a in run.plan.actions
        if a.kind is ActionKind.RELOAD and a.handler and a.handler not in run.failed_handlers
    }
    for name in sorted(reloading):
        service = _service_of(run, name)
        i = _start_action(run, service)
        if service is None or i is None or run.plan.actions[i].after_package:
            continue
        started = await _start_and_prove(run, name, service)
        if started.ok:
            before = "started on its live configuration before the new one was swapped in"
            run.mark(i, "done", f"{before}; {started.text}")
            continue
        run.down_on_old.add(name)
        run.messages.append(
            f"service {service.name} was down and does not start on its live configuration either "
            f"({started.text}); the new configuration is started instead once validated, and its "
            "old files are put back if that fails too"
        )


async def _reloads(run: _Run) -> None:
    for i in run.indices({ActionKind.RELOAD}):
        a = run.plan.actions[i]
        name = a.handler
        assert name is not None
        if name in run.failed_handlers:
            run.mark(i, "skipped", "its changes did not apply: nothing reloaded")
            continue
        service = _service_of(run, name)
        first = await _reload_once(run, name)
        if run.journal is not None:
            run.journal.discard(name)  # the reload ran: no longer pending, whatever its outcome
        if first.ok:
            run.reloaded.append(name)
            run.mark(i, "done", first.text)
            start = _start_action(run, service) if first.started else None
            if start is not None:
                run.mark(start, "done", f"started on the new configuration; {first.text}")
            continue
        restore_text = await _restore(run, name)
        again = await _reload_once(run, name)
        if again.ok and again.down:
            after = "the service is not running any more (it has no declared service to start)"
        elif again.ok and again.started:
            after = f"{service.name if service else name} was started again on them ({again.text})"
        elif again.ok:
            after = "reloaded with the old files"
        elif again.started:
            after = f"{service.name if service else name} does not start on them either: {again.text}"
        else:
            after = f"reload with the old files failed too: {again.text}"
        what = "start" if first.started else "reload"
        msg = f"{what} of {name} failed: {first.text}; its files were restored and {after}"
        if restore_text:
            msg += f" ({restore_text})"
        run.mark(i, "failed", msg)
        run.messages.append(msg)
        run.failed_handlers.add(name)
        start = _start_action(run, service)
        if start is not None:
            run.mark(start, "done" if again.ok and again.started else "failed", after)
        # The new files broke a service that ran (or started) on the old ones: terminal for
        # this commit. A service that was down and started on neither: its cause may lie
        # outside the config (a port taken, a full disk): retried with backoff.
        if name in run.down_on_old:
            run.fail(Reason.SERVICE_FAILED, msg)
        else:
            run.fail(Reason.RELOAD_BROKE_SERVICE, msg)


async def _services(run: _Run) -> None:
    idx = run.indices({ActionKind.START_SERVICE, ActionKind.ENABLE_SERVICE})
    if not idx:
        return
    conn = await run.conn()
    for i in idx:
        a = run.plan.actions[i]
        s = a.target
        assert isinstance(s, Service)
        if a.kind is ActionKind.ENABLE_SERVICE:
            outcome = await packaging.enable_service(conn, s, run.plan.init_system)
        else:
            outcome = await packaging.start_service(conn, s, run.plan.init_system)
        run.mark(i, "done" if outcome.ok else "failed", outcome.message)
        if not outcome.ok:
            run.messages.append(f"service {s.name}: {outcome.message}")


# Start each named CHILD_SA without waiting for it: a negative timeout makes the vici
# `initiate` asynchronous (charon queues the exchange and answers at once), so a host with 49
# peers costs 49 short vici round trips, not 49 waits on peers that may be busy themselves.
INITIATE = r"""
for c in "$@"; do swanctl --initiate --child "$c" --timeout -1 >/dev/null 2>&1 || true; done
"""


async def _initiate(run: _Run) -> None:
    idx = run.indices({ActionKind.INITIATE_CHILD})
    if not idx:
        return
    names = [run.plan.actions[i].resource.removeprefix("ipsec child ") for i in idx]
    conn = await run.conn()
    await conn.run_script(INITIATE, args=names, timeout=30)
    for i in idx:
        # the pair's other side may not be ready yet: the next reconcile looks again
        run.mark(i, "done", "initiated (settles once the peer answers)")


# $1 inventory path ("" = do not record), $2 temp suffix, $3 journal path, $4 identity path
# ("" = do not record), $5 the identity file's text; then "--", journal lines (or "-" to leave
# the journal alone, nothing to clear it), "--", backups to remove. stdin: the inventory.
# The identity is written after the inventory and never without it (a new identity over an
# old inventory would let the next plan prune another fleet's paths).
FINISH = r"""
set -u
inv=$1; tmpsfx=$2; j=$3; idp=$4; idc=$5; shift 6
if [ "${1:-}" = - ]; then shift
elif [ "${1:-}" = -- ]; then rm -f "$j" || echo "@@J cannot clear $j"
else
  mkdir -p "${j%/*}"; t="${j%/*}/.pending-reloads.reconciler-$tmpsfx"; : > "$t"
  while [ $# -gt 0 ] && [ "$1" != -- ]; do printf '%s\n' "$1" >> "$t"; shift; done
  mv -f "$t" "$j" || echo "@@J cannot write $j"
fi
[ "${1:-}" = -- ] && shift
# leftovers (.NAME.reconciler-*: this run's backups, temps and backups of interrupted runs):
# first in root-only directories, by name (a link is removed, never followed; only root can
# change those directories), then "--" and the path-safety helper with its operations for
# directories another user controls
while [ $# -gt 0 ] && [ "$1" != -- ]; do rm -f -- "$1"/.*.reconciler-* 2>/dev/null; shift; done
[ "${1:-}" = -- ] && shift
if [ $# -gt 0 ]; then h=$1; shift; perl -e "$h" -- args "$@" || echo "@@C cannot remove leftovers"; fi
if [ -n "$inv" ]; then
  d=${inv%/*}; t="$d/.inventory.json.reconciler-$tmpsfx"
  if mkdir -p "$d" && cat > "$t" && mv -f "$t" "$inv"; then echo "@@INV ok"
  else rm -f "$t"; echo "@@INV failed"; idp=; fi
fi
if [ -n "$idp" ]; then
  d=${idp%/*}; t="$d/.identity.reconciler-$tmpsfx"
  if mkdir -p "$d" && printf '%s' "$idc" > "$t" && chmod 0644 "$t" && mv -fT "$t" "$idp"
  then echo "@@ID ok"
  else rm -f "$t"; echo "@@ID failed"; fi
fi
"""


def _leftover_args(run: _Run) -> list[str]:
    """FINISH's arguments that remove this apply's backups and any leftovers
    (``.NAME.reconciler-*``) of interrupted earlier ones from the directories of this plan's
    files and of the handlers an interrupted apply left in the journal (a kill during a reload
    leaves its backups behind): root-only directories by shell glob (no process but ``rm``),
    then "--" and the path-safety helper's operations for directories another user controls."""
    actions = run.plan.actions
    interrupted = {a.handler for a in actions if a.kind is ActionKind.RELOAD and INTERRUPTED in a.reason}
    where: dict[str, tuple[str, Rule]] = {}
    for a in actions:
        if a.kind in FILE_KINDS and a.path:
            where.setdefault(posixpath.dirname(a.path), (a.path, _rule(a)))
    for f in run.desired.files:
        if f.handler in interrupted:
            where.setdefault(posixpath.dirname(f.path), (f.path, rule_of(f)))
    strict = [d for d, (_, rule) in where.items() if rule.strict]
    guarded = [(p, rule) for p, rule in where.values() if not rule.strict]
    if not guarded:
        return strict
    b = _batch(run)
    for p, rule in guarded:
        b.clean(p, rule, keep_token=False)
    return [*strict, "--", pathsafe.HELPER, *b.args()]


async def _finish(run: _Run) -> None:
    """One round trip: remove this apply's backups (and leftovers of interrupted ones), bring
    the pending-reloads journal up to date (cleared once every pending reload ran), record the
    inventory if every action succeeded."""
    backups = [i for i, b in run.swapped.items() if b]
    all_ok = not any(o.status in ("failed", "skipped") for o in run.outcomes.values())
    record = [i for i in run.indices({ActionKind.RECORD_INVENTORY})]
    ident = [i for i in run.indices({ActionKind.RECORD_IDENTITY})]
    if not all_ok:
        for i in record + ident:
            run.mark(i, "skipped", "not recorded: the apply did not fully succeed")
        ident = []
    identity = run.plan.identity if ident else None
    journal = ["-"] if run.journal is None else sorted(run.journal)
    # the inventory is rewritten only when it changes (the plan's observation read it)
    seen = run.plan.observed
    unchanged = seen is not None and not seen.errors and tuple(sorted(seen.inventory)) == run.plan.inventory
    write_inventory = all_ok and (bool(record) or not unchanged)
    if run.journal is None and not backups and not write_inventory and identity is None:
        return
    leftovers = _leftover_args(run) if backups or run.journal is not None else []
    args = (INVENTORY_PATH if write_inventory else "", run.token, PENDING_RELOADS_PATH,
            IDENTITY_PATH if identity is not None else "",
            format_identity(identity).decode() if identity is not None else "",
            "--", *journal, "--", *leftovers)  # fmt: skip
    run.finished = True
    conn = await run.conn()
    res = await conn.run_script(
        FINISH,
        args=args,
        stdin_after=inventory_json(run.plan.inventory) if write_inventory else None,
        timeout=60,
    )
    out = res.stdout.decode(errors="replace")
    for tag in ("@@J ", "@@C "):
        if tag in out:
            run.messages.append(out.split(tag, 1)[1].splitlines()[0])
    if identity is not None:
        written = "@@ID ok" in out
        for i in ident:
            run.mark(i, "done" if written else "failed", "" if written else f"not written: {_text(res)}")
        if not written:
            run.messages.append(f"could not record the host identity {IDENTITY_PATH}: {_text(res)}")
    if not write_inventory:
        return
    ok = "@@INV ok" in out
    for i in record:
        run.mark(i, "done" if ok else "failed", "" if ok else _text(res))
    if not ok:
        run.messages.append(f"could not record the inventory: {_text(res)}")
