"""Desired x Observed -> HostPlan: ordered actions, each with a reason and a diff. Pure.

The plan is a value: ``reconciler plan`` prints it, ``reconciler apply`` runs that same value
(``reconciler.engine.apply.apply_host``). Nothing here does I/O, reads a clock or a random source.

Order: by ``resources.Domain`` (packages, firewall, key pairs, IPsec, tunnels, AppArmor,
Apache, other files, services); inside a domain deletes come after creates/updates of the
same domain; a handler's reload comes right after the last action that touches its files.

Packages: the plan is computed against the state after its own package actions. A resource
whose ``needs_package`` is being installed is planned as if the package were there (its action
carries ``after_package``; apply installs first); one whose package is absent and not being
installed (or is purged by the fleet) is a plan error naming the resource, not a cascade of
failures. See docs/PACKAGES.md.

Prune: a path in the host's previous inventory (``Observed.inventory``) or in one of the
``Desired.owned_dirs`` that is no longer desired is deleted, with the reason "left the fleet".
Key pairs are never pruned (a private key is not ours to destroy silently).

Identity (``reconciler.engine.identity``): given the fleet's claim on the host, a host that another
fleet (or this fleet under another host name) claims gets a plan with a ``refusal`` and no
action at all; a host without an identity, or one taken over with ``adopt``, gets a
``record-identity`` action and NO prune from its inventory (that record is not this fleet's:
its paths are listed in a warning and left alone; owned directories are still pruned).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TypeVar

from reconciler.engine.identity import IDENTITY_PATH, HostIdentity, Judgement, Verdict, judge
from reconciler.host.state import INVENTORY_PATH
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.kind import PlanStep
from reconciler.kinds.observed import Observed
from reconciler.kinds.packages import unmet_requirements
from reconciler.kinds.registry import KINDS, PACKAGES
from reconciler.kinds.resources import (
    Desired,
    Domain,
    FileResource,
    KeyPair,
    LinkResource,
    Package,
    Pending,
    Service,
)

_R = TypeVar("_R", FileResource, LinkResource, KeyPair, Service)

TEMP_MARKER = ".reconciler-"  # staged temps are "<dir>/.<name>.reconciler-<random>"


# ---------------------------------------------------------------- planning


def plan_host(
    desired: Desired, observed: Observed, identity: HostIdentity | None = None, *, adopt: bool = False
) -> HostPlan:
    """Compare what a host should be with what it is; return the ordered actions.

    ``identity``: this fleet's claim on the host (``reconciler.engine.identity.claim_for``); None skips
    the identity check (tests, benchmarks). ``adopt``: take the host over when it claims another
    fleet or host name."""
    actions: list[Action] = []
    skipped: list[Pending] = []
    warnings: list[str] = list(desired.warnings)

    errors: list[str] = list(observed.errors)
    verdict = judge(identity, observed.identity, adopt=adopt) if identity is not None else None

    def refused(reason: str, *, requirement: bool = False) -> HostPlan:
        """A plan with no actions: the host is left alone, and why."""
        return HostPlan(
            host=desired.host,
            warnings=tuple(warnings),
            errors=tuple(errors),
            init_system=observed.init_system,
            observed=observed,
            identity=identity,
            refusal=reason,
            refused_requirement=requirement,
        )

    if verdict is not None and verdict.verdict is Verdict.REFUSE:
        return refused(verdict.message)
    unmet = unmet_requirements(desired, observed)
    if unmet:
        return refused(unmet, requirement=True)

    # packages first: the simulated state (what is installed once they ran) decides the rest
    step = PlanStep(desired, desired, observed, errors, warnings, skipped)
    pkg_actions = list(PACKAGES.plan(step))
    actions += pkg_actions
    if not any(a.kind is ActionKind.INSTALL_PACKAGE for a in pkg_actions):
        # a package being installed may ship it: then the apply's validation judges it
        for ex in desired.expects:
            live = observed.files.get(ex.path)
            if live is not None and not live.exists and not live.refused:
                errors.append(ex.reason)
    deps = _Packages.after(desired, observed, pkg_actions)
    kept = replace(
        desired,
        files=deps.keep(desired.files, "file", lambda f: f.path, errors),
        links=deps.keep(desired.links, "link", lambda lk: lk.path, errors),
        keypairs=deps.keep(desired.keypairs, "keypair", lambda k: k.name, errors),
        services=deps.keep(desired.services, "service", lambda sv: sv.name, errors),
    )
    step = replace(step, kept=kept)
    for kind in KINDS:
        if kind is not PACKAGES:
            actions += kind.plan(step)
    prune_inventory = verdict is None or verdict.prune_inventory
    actions += _plan_prune(desired, observed, use_inventory=prune_inventory)
    actions += _plan_absent(desired, observed, already={a.path for a in actions if a.path})
    if not prune_inventory:
        warnings += _unpruned(desired, observed)

    actions = [deps.annotate(a, desired) for a in actions]
    actions.sort(key=lambda a: (int(a.domain), a.kind.order, a.resource))
    actions = _insert_reloads(actions, desired)
    actions = _interrupted_reloads(actions, desired, observed)
    if verdict is not None and verdict.record and identity is not None:
        actions.append(_record_identity(identity, verdict))

    inventory = managed_paths(desired)
    if actions or tuple(sorted(observed.inventory)) != inventory:
        # written last, after a successful apply; on its own it is a change too
        if not actions:
            actions.append(
                Action(
                    kind=ActionKind.RECORD_INVENTORY,
                    resource=f"inventory {INVENTORY_PATH}",
                    domain=Domain.FILES,
                    reason="the record of managed paths (used to prune) is out of date",
                    path=INVENTORY_PATH,
                )
            )

    noop = ""
    if not actions:
        noop = _noop_reason(desired, observed, skipped)
    return HostPlan(
        host=desired.host,
        actions=tuple(actions),
        pending=desired.pending,
        skipped=tuple(skipped),
        warnings=tuple(warnings),
        errors=tuple(errors),
        inventory=inventory,
        noop_reason=noop,
        init_system=observed.init_system,
        observed=observed,
        identity=identity,
    )


def _record_identity(identity: HostIdentity, verdict: Judgement) -> Action:
    """Written in the finish step, with the inventory, only when every other action succeeded."""
    return Action(
        kind=ActionKind.RECORD_IDENTITY,
        resource=f"identity {IDENTITY_PATH}",
        domain=Domain.FILES,
        reason=verdict.message,
        path=IDENTITY_PATH,
    )


def _unpruned(desired: Desired, observed: Observed) -> list[str]:
    """Inventory paths that would have been pruned, had the inventory been this fleet's."""
    left = [
        p
        for p in _inventory_candidates(desired, observed)
        if _exists(observed, p) and not any(_under(p, d) for d in desired.owned_dirs)
    ]
    if not left:
        return []
    shown = ", ".join(left[:20]) + (f" and {len(left) - 20} more" if len(left) > 20 else "")
    return [
        f"not pruned: {len(left)} path(s) in the host's inventory that this fleet does not declare "
        f"({shown}): the inventory was not recorded under this fleet's identity, so they stay on "
        "the host, no longer recorded (remove them by hand if unwanted)"
    ]


def _exists(observed: Observed, path: str) -> bool:
    live = observed.files.get(path)
    return live is None or (live.exists and live.kind != "dir")


def managed_paths(desired: Desired) -> tuple[str, ...]:
    """The paths recorded in the host's inventory (files, links, the persistent ruleset)."""
    paths = {f.path for f in desired.files} | {lk.path for lk in desired.links}
    if desired.firewall is not None:
        paths.add(desired.firewall.persistent_path)
        if desired.firewall.rules_v6 is not None:
            paths.add(desired.firewall.persistent_path_v6)
    return tuple(sorted(paths))


def inventory_json(paths: Iterable[str]) -> bytes:
    return (json.dumps(sorted(paths), indent=1) + "\n").encode()


def _noop_reason(desired: Desired, observed: Observed, skipped: list[Pending]) -> str:
    parts = [
        f"{len(desired.files)} files",
        f"{len(desired.links)} links",
        f"{len(desired.keypairs)} key pairs",
        f"{len(desired.tunnels)} tunnels",
        f"{len(desired.services)} services",
        f"{len(desired.packages)} packages",
    ]
    fw = "the firewall ruleset" if desired.firewall is not None else "no firewall"
    text = f"in sync: {', '.join(parts)} and {fw} match the host"
    if skipped:
        text += f"; {len(skipped)} skipped"
    if desired.pending:
        text += f"; {len(desired.pending)} pending"
    if observed.errors:
        text += f"; but {len(observed.errors)} parts could not be observed"
    return text


class _Packages:
    """The packages a host has once this plan's package actions ran (the simulated state).

    A file, link, key pair or service whose ``needs_package`` is being installed is planned as
    if the package were there (and marked ``after_package``: apply installs first, then stages,
    validates and swaps; validators that the package brings run after the install). One whose
    package is absent and not being installed (or is being purged) is not planned at all: it
    is reported once, as a plan error naming the resource and the package.
    """

    def __init__(self, installing: set[str], gone: dict[str, str], known: set[str], wanted: set[str]) -> None:
        self.installing = installing  # installed by this plan
        self.gone = gone  # package -> why it will not be there
        self.known = known  # observed by dpkg-query
        self.wanted = wanted  # declared present by the fleet

    @classmethod
    def after(cls, desired: Desired, observed: Observed, pkg_actions: list[Action]) -> _Packages:
        installing = {
            a.target.name
            for a in pkg_actions
            if a.kind is ActionKind.INSTALL_PACKAGE and isinstance(a.target, Package)
        }
        purged = {p.name for p in desired.packages if p.state == "purged"}
        wanted = {p.name for p in desired.packages if p.state == "present"}
        gone: dict[str, str] = {}
        for name, st in observed.packages.items():
            if name in purged:
                gone[name] = "which the fleet purges (purge_packages)"
            elif not st.installed and name not in installing:
                gone[name] = "which is not installed and which no role or domain installs"
        for name in purged:
            gone.setdefault(name, "which the fleet purges (purge_packages)")
        return cls(installing, gone, set(observed.packages), wanted)

    def keep(
        self,
        resources: tuple[_R, ...],
        label: str,
        name: Callable[[_R], str],
        errors: list[str],
    ) -> tuple[_R, ...]:
        out: list[_R] = []
        for r in resources:
            pkg = getattr(r, "needs_package", None)
            if pkg and pkg in self.gone:
                errors.append(
                    f"{label} {name(r)}: needs package {pkg}, {self.gone[pkg]}; not planned "
                    "(declare the package, or stop managing what depends on it)"
                )
                continue
            out.append(r)
        return tuple(out)

    def annotate(self, a: Action, desired: Desired) -> Action:
        pkg = getattr(a.target, "needs_package", None)
        if not pkg or pkg not in self.installing:
            return a
        reason = f"{a.reason}; after the install of {pkg} (planned as if installed)"
        checks = _validator_names(a, desired)
        if checks:
            reason += f"; validated after the install ({', '.join(checks)})"
        return replace(a, reason=reason, after_package=pkg)


def _validator_names(a: Action, desired: Desired) -> list[str]:
    names: list[str] = []
    if isinstance(a.target, FileResource):
        names += [" ".join(v.argv[:2]) for v in a.target.validators]
    if a.handler:
        try:
            names += [" ".join(v.argv[:2]) for v in desired.handler(a.handler).validators]
        except KeyError:
            pass
    return list(dict.fromkeys(names))


def _under(path: str, directory: str) -> bool:
    d = directory.rstrip("/") + "/"
    return path.startswith(d)


def _wanted_paths(desired: Desired) -> set[str]:
    wanted = set(managed_paths(desired)) | {k.private_path for k in desired.keypairs}
    return wanted | {k.public_path for k in desired.keypairs}


def _inventory_candidates(desired: Desired, observed: Observed) -> list[str]:
    wanted = _wanted_paths(desired)
    return sorted(p for p in set(observed.inventory) if p not in wanted)


def _plan_prune(desired: Desired, observed: Observed, *, use_inventory: bool = True) -> list[Action]:
    """``use_inventory=False``: the inventory is not this fleet's record (no identity yet, or
    another fleet's): only the owned directories, wholly this fleet's, are pruned."""
    wanted = _wanted_paths(desired)
    candidates: set[str] = set(_inventory_candidates(desired, observed)) if use_inventory else set()
    for p, st in observed.files.items():
        if p in wanted or (not st.exists and not st.refused) or st.kind == "dir":
            continue
        if any(_under(p, d) for d in desired.owned_dirs):
            if TEMP_MARKER in posixpath.basename(p):
                continue  # a stale staged temp: removed by the next apply's staging step
            candidates.add(p)
    out: list[Action] = []
    for p in sorted(candidates):
        live = observed.files.get(p)
        handler, domain = _owner_of(p, desired)
        if live is not None and live.refused:
            # a link (or another user's directory) on the way: nothing deleted through it
            reason = f"left the fleet, but not deleted: {live.refused}"
            out.append(Action(ActionKind.REFUSED, f"file {p}", domain, reason, "", p, handler))
            continue
        if live is not None and not live.exists:
            continue  # already gone
        if live is not None and live.kind == "dir":
            continue
        # no content shown: a file that left the fleet may have been a secret
        diff = ""
        out.append(Action(ActionKind.DELETE, f"file {p}", domain, "left the fleet", diff, p, handler))
    return out


def _plan_absent(desired: Desired, observed: Observed, *, already: set[str]) -> list[Action]:
    """Paths that must not exist and do (another stack's configuration, a replaced default)."""
    out: list[Action] = []
    for ab in desired.absent:
        live = observed.files.get(ab.path)
        if ab.path in already or live is None or not (live.exists or live.refused):
            continue
        if live.refused:
            reason = f"{ab.reason}, but not deleted: {live.refused}"
            out.append(
                Action(ActionKind.REFUSED, f"file {ab.path}", ab.domain, reason, "", ab.path, ab.handler)
            )
        elif live.kind != "dir":
            out.append(
                Action(ActionKind.DELETE, f"file {ab.path}", ab.domain, ab.reason, "", ab.path, ab.handler)
            )
    return out


def _owner_of(path: str, desired: Desired) -> tuple[str | None, Domain]:
    """The handler and domain responsible for a pruned path: the handler whose validated tree
    holds it, else a desired file in the same directory."""
    for h in desired.handlers:
        for v in h.validators:
            if v.tree_root and _under(path, v.tree_root):
                dom = next(
                    (f.domain for f in desired.files if f.handler == h.name),
                    Domain.FILES,
                )
                return h.name, dom
    directory = posixpath.dirname(path)
    best: FileResource | None = None
    for f in desired.files:
        if posixpath.dirname(f.path) == directory:
            best = f
            break
    if best is not None:
        return best.handler, best.domain
    return None, Domain.FILES


def _insert_reloads(actions: list[Action], desired: Desired) -> list[Action]:
    """A reload per affected handler, right after the last action that touches it."""
    last: dict[str, int] = {}
    for i, a in enumerate(actions):
        if a.handler and a.kind is not ActionKind.RELOAD:
            last[a.handler] = i
    out: list[Action] = []
    known = {h.name for h in desired.handlers}
    for i, a in enumerate(actions):
        out.append(a)
        for name, idx in sorted(last.items()):
            if idx != i:
                continue
            if name not in known:
                continue  # a handler nobody declared: nothing to reload (render should prevent it)
            h = desired.handler(name)
            if not h.reload:
                continue
            files = sorted({x.path or x.resource for x in actions if x.handler == name})
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            reason = f"after changes to {shown}"
            after = sorted({x.after_package for x in actions if x.handler == name and x.after_package})
            if after:
                checks = [" ".join(v.argv[:2]) for v in h.validators]
                validated = f"validated ({', '.join(checks)}) and " if checks else ""
                reason += f"; {validated}reloaded after the install of {', '.join(after)}"
            out.append(
                Action(
                    ActionKind.RELOAD,
                    f"handler {name}",
                    a.domain,
                    reason,
                    handler=name,
                    after_package=after[0] if after else None,
                )
            )
    return out


INTERRUPTED = "a previous apply was interrupted before reloading"


def _interrupted_reloads(actions: list[Action], desired: Desired, observed: Observed) -> list[Action]:
    """A reload for every handler in the host's pending-reloads journal (an apply swapped its
    files in and was cut off before reloading it) that is still desired and has a reload."""
    out = list(actions)
    for name in observed.pending_reloads:
        h = next((x for x in desired.handlers if x.name == name), None)
        if h is None or not h.reload:
            continue  # left the fleet, or nothing to reload
        at = next((i for i, a in enumerate(out) if a.kind is ActionKind.RELOAD and a.handler == name), None)
        if at is not None:
            out[at] = replace(out[at], reason=f"{out[at].reason}; {INTERRUPTED}")
            continue
        domain = min((f.domain for f in desired.files if f.handler == name), default=Domain.FILES)
        pos = sum(1 for a in out if int(a.domain) <= int(domain))
        out.insert(pos, Action(ActionKind.RELOAD, f"handler {name}", domain, INTERRUPTED, handler=name))
    return out
