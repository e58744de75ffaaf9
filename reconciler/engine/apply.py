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

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import cast

from reconciler.engine import deadman
from reconciler.engine.finish import finish_phase
from reconciler.engine.hostlock import Holder, host_lock
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.engine.reloads import reloads_phase, services_phase, start_down, stop_replaced
from reconciler.engine.run import ActionOutcome, HostRun, reobserve_scope
from reconciler.engine.transaction import files_phase
from reconciler.errors import Failure, Reason, ReconcilerError, pick_failure
from reconciler.host.connection import Connection
from reconciler.host.script import Pool
from reconciler.kinds import ipsec, keypairs, packaging, tunnels
from reconciler.kinds.actions import (
    SETTLING_KINDS,
    ActionKind,
    HostPlan,
)
from reconciler.kinds.observed import Observed
from reconciler.kinds.registry import KINDS
from reconciler.kinds.resources import (
    Desired,
    FirewallRuleset,
    Package,
)
from reconciler.log import get_logger

log = get_logger(__name__)

# Fault injection for tests only: awaited with the host name right after the swap, before any
# reload (a test kills the SSH session there). Never set in production code.
FAULT_AFTER_SWAP: Callable[[str], Awaitable[None]] | None = None


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

    def change_counts(self) -> tuple[int, int]:
        """(changes that landed, changes planned), reloads not counted."""
        changes = [o for o in self.outcomes if o.action.kind is not ActionKind.RELOAD]
        return sum(1 for o in changes if o.status == "done"), len(changes)

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
    run = HostRun(conn_pool, host, plan, desired, secrets.token_hex(6))
    phase = "start"
    try:
        phase = "host lock"
        async with host_lock(cast(Holder, await run.conn()), host):
            phase = "packages"
            await _packages(run)
            phase = "firewall"
            await _firewall(run, firewall_window)
            if run.stopped is None:
                phase = "key pairs"
                await keypairs.apply_keypairs(run)
                phase = "old stack stopped before the swap"
                await stop_replaced(run)
                phase = "services down before the swap"
                await start_down(run)
                phase = "files"
                await files_phase(run)
                if FAULT_AFTER_SWAP is not None:
                    await FAULT_AFTER_SWAP(host)
                phase = "tunnels"
                await tunnels.apply_tunnels(run)
                await tunnels.apply_addresses(run)
                phase = "reloads"
                await reloads_phase(run)
                for kind in KINDS:
                    phase = kind.name
                    await kind.apply(run)
                phase = "services"
                await services_phase(run)
                phase = "ipsec children"
                await ipsec.apply_initiate(run)
                phase = "finish"
                await finish_phase(run)
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


def _failure(run: HostRun, outcomes: tuple[ActionOutcome, ...], converged: bool) -> Failure:
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


async def reobserve(conn: Connection, run: HostRun) -> Observed:
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


# ---------------------------------------------------------------- packages


async def _packages(run: HostRun) -> None:
    idx = run.indices({ActionKind.INSTALL_PACKAGE, ActionKind.PURGE_PACKAGE})
    if not idx:
        return
    conn = await run.conn()
    failed: dict[str, str] = {}
    # purges first: a package the fleet purges may be what blocks an install (a conflict)
    for kind, verb in ((ActionKind.PURGE_PACKAGE, "purge"), (ActionKind.INSTALL_PACKAGE, "install")):
        group: dict[str, int] = {}
        allow: set[str] = set()
        for i in idx:
            target = run.plan.actions[i].target
            if run.plan.actions[i].kind is kind and isinstance(target, Package):
                group[target.name] = i
                allow.update(target.replaces)
        if not group:
            continue
        result = await packaging.apt(conn, verb, list(group), allow_removal=sorted(allow))
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


def _hold_dependents(run: HostRun, failed: dict[str, str]) -> None:
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


async def _firewall(run: HostRun, window: float) -> None:
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
