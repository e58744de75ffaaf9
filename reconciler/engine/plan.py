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

import difflib
import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TypeVar

from reconciler.engine.identity import IDENTITY_PATH, HostIdentity, Judgement, Verdict, judge
from reconciler.kinds import ipsec, tunnels
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.observed import FileState, IptablesState, Observed
from reconciler.kinds.registry import KINDS
from reconciler.kinds.resources import (
    Desired,
    Domain,
    FileResource,
    FirewallRuleset,
    KeyPair,
    LinkResource,
    Package,
    Pending,
    Service,
)
from reconciler.netfilter.iptables import canonical_iptables

_R = TypeVar("_R", FileResource, LinkResource, KeyPair, Service)

INVENTORY_PATH = "/var/lib/reconciler/inventory.json"
SECRET_DIFF = "(secret: content hidden)"  # noqa: S105 (a label, not a secret)
TEMP_MARKER = ".reconciler-"  # staged temps are "<dir>/.<name>.reconciler-<random>"


# ---------------------------------------------------------------- diffs


def text_diff(old: bytes | None, new: bytes | None, path: str) -> str:
    """A unified diff of two contents ("" when equal); binary content is not shown."""
    if old == new:
        return ""
    try:
        old_text = (old or b"").decode("utf-8")
        new_text = (new or b"").decode("utf-8")
    except UnicodeDecodeError:
        return "(binary content differs)"
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True),
        new_text.splitlines(keepends=True),
        fromfile=f"{path} (live)" if old is not None else "/dev/null",
        tofile=f"{path} (desired)" if new is not None else "/dev/null",
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def iptables_text(state: IptablesState, tables: Iterable[str] | None = None) -> str:
    """Canonical text of a ruleset (the tables given, or all), as compared by the plan."""
    out: list[str] = []
    names = sorted(state.tables) if tables is None else list(tables)
    for name in names:
        if name not in state.tables:
            continue
        policies, rules = state.tables[name]
        out.append(f"*{name}")
        out.extend(f":{chain} {policy}" for chain, policy in policies)
        out.extend(rules)
        out.append("COMMIT")
    return "\n".join(out) + ("\n" if out else "")


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
    if verdict is not None and verdict.verdict is Verdict.REFUSE:
        return HostPlan(
            host=desired.host,
            warnings=tuple(warnings),
            errors=tuple(errors),
            init_system=observed.init_system,
            observed=observed,
            identity=identity,
            refusal=verdict.message,
        )

    pkg_actions = _plan_packages(desired.packages, observed)
    actions += pkg_actions
    # the simulated state: what is installed once the package actions ran
    deps = _Packages.after(desired, observed, pkg_actions)
    files = deps.keep(desired.files, "file", lambda f: f.path, errors)
    links = deps.keep(desired.links, "link", lambda lk: lk.path, errors)
    keypairs = deps.keep(desired.keypairs, "keypair", lambda k: k.name, errors)
    services = deps.keep(desired.services, "service", lambda sv: sv.name, errors)
    if desired.firewall is not None:
        declared = frozenset(f.path for f in desired.files)
        actions += _plan_firewall(desired.firewall, observed, declared=declared, warnings=warnings)
    actions += _plan_keypairs(keypairs, observed, warnings)
    actions += _plan_files(files, observed)
    actions += _plan_links(links, observed)
    prune_inventory = verdict is None or verdict.prune_inventory
    actions += _plan_prune(desired, observed, use_inventory=prune_inventory)
    if not prune_inventory:
        warnings += _unpruned(desired, observed)
    t_actions, t_skipped = tunnels.plan_tunnels(desired.tunnels, observed)
    actions += t_actions
    skipped += t_skipped
    actions += tunnels.plan_addresses(desired.addresses, observed)
    actions += _plan_services(services, observed)
    actions += ipsec.plan_initiate(desired, observed)
    for kind in KINDS:
        actions += kind.plan(desired, observed)

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


def _plan_packages(packages: tuple[Package, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for p in packages:
        state = observed.packages.get(p.name)
        if state is None:
            continue  # not observed: nothing known, nothing planned
        if p.state == "present" and not state.installed:
            out.append(
                Action(ActionKind.INSTALL_PACKAGE, f"package {p.name}", p.domain, "not installed", target=p)
            )
        elif p.state == "purged" and state.installed:
            out.append(
                Action(
                    ActionKind.PURGE_PACKAGE,
                    f"package {p.name}",
                    p.domain,
                    "installed, but the fleet purges it",
                    target=p,
                )
            )
    return out


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


def _plan_firewall(
    fw: FirewallRuleset,
    observed: Observed,
    *,
    declared: frozenset[str] = frozenset(),
    warnings: list[str] | None = None,
) -> list[Action]:
    """One ``restore-firewall`` action when the live IPv4 or IPv6 ruleset differs (both are
    loaded together under one dead-man switch); otherwise the persistent files, unless they are
    declared files of their own (``declared``)."""
    if fw.rules_v6 is not None and observed.kernel.get("ipv6") is False:
        if warnings is not None:
            warnings.append(
                "firewall: the kernel has no IPv6 (no /proc/net/if_inet6): rules.v6 is not loaded"
            )
        fw = replace(fw, rules_v6=None)
    diffs: list[str] = []
    reasons: list[str] = []
    for label, want_rules, live in (
        ("iptables", fw.rules_v4, observed.iptables),
        ("ip6tables", fw.rules_v6, observed.ip6tables),
    ):
        if want_rules is None:
            continue
        want = canonical_iptables(want_rules)
        tables = sorted(want.tables)
        live_text = "" if live is None else iptables_text(live, tables)
        want_text = iptables_text(want, tables)
        if live_text == want_text:
            continue
        family = "IPv6" if label == "ip6tables" else "IPv4"
        reasons.append(
            f"the live {family} ruleset could not be read"
            if live is None
            else f"the live {family} netfilter ruleset differs"
        )
        diffs.append(
            "".join(
                difflib.unified_diff(
                    live_text.splitlines(keepends=True),
                    want_text.splitlines(keepends=True),
                    fromfile=f"{label} (live)",
                    tofile=f"{label} (desired)",
                )
            )
        )
    if diffs:
        return [
            Action(
                ActionKind.RESTORE_FIREWALL,
                "firewall",
                fw.domain,
                "; ".join(reasons) + "; applied under a dead-man rollback",
                diff="".join(diffs),
                path=fw.persistent_path,
                target=fw,
            )
        ]  # the persistent files are written after the live rules are confirmed
    out: list[Action] = []
    persistent = [(fw.persistent_path, fw.rules_v4)]
    if fw.rules_v6 is not None:
        persistent.append((fw.persistent_path_v6, fw.rules_v6))
    for path, text in persistent:
        state = observed.files.get(path)
        if state is not None and path not in declared:
            file_res = FileResource(path=path, content=text.encode(), domain=fw.domain, mode=0o640)
            out += _plan_file(file_res, state)
    return out


def _plan_keypairs(keypairs: tuple[KeyPair, ...], observed: Observed, warnings: list[str]) -> list[Action]:
    out: list[Action] = []
    for kp in keypairs:
        priv = observed.files.get(kp.private_path)
        pub = observed.files.get(kp.public_path)
        bad = next((st for st in (priv, pub) if st is not None and st.refused), None)
        if bad is not None:
            out.append(
                Action(
                    ActionKind.REFUSED,
                    f"keypair {kp.name}",
                    kp.domain,
                    refused_reason(bad),
                    path=kp.private_path,
                    handler=kp.handler,
                    target=kp,
                )
            )
        elif priv is None or not priv.exists:
            out.append(
                Action(
                    ActionKind.GENERATE_KEYPAIR,
                    f"keypair {kp.name}",
                    kp.domain,
                    f"no private key at {kp.private_path}: generate it on the host (never copied off)",
                    path=kp.private_path,
                    handler=kp.handler,
                    target=kp,
                )
            )
        elif pub is not None and not pub.exists:
            warnings.append(
                f"keypair {kp.name}: private key present but {kp.public_path} is missing; "
                "not regenerating (peers trust the current key); restore the public key by hand"
            )
    return out


def _plan_files(files: tuple[FileResource, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for f in files:
        state = observed.files.get(f.path) or FileState(path=f.path, exists=False)
        unknown = []
        if f.owner in observed.unknown_users:
            unknown.append(f"no user {f.owner}")
        if f.group in observed.unknown_groups:
            unknown.append(f"no group {f.group}")
        if unknown and not state.refused:
            why = f"{' and '.join(unknown)} on this host (owner {f.owner}:{f.group}); nothing changed"
            out.append(Action(ActionKind.REFUSED, f"file {f.path}", f.domain, why, "", f.path, f.handler, f))
            continue
        out += _plan_file(f, state)
    return out


def refused_reason(state: FileState) -> str:
    """The reason shown for a refused path: what is wrong, and that nothing went through it."""
    return f"refused: {state.refused}; nothing read or changed through it"


def _plan_file(f: FileResource, state: FileState) -> list[Action]:
    res = f"file {f.path}"
    if state.refused:
        return [Action(ActionKind.REFUSED, res, f.domain, refused_reason(state), "", f.path, f.handler, f)]
    if not state.exists:
        diff = SECRET_DIFF if f.secret else text_diff(None, f.content, f.path)
        return [Action(ActionKind.CREATE, res, f.domain, "missing", diff, f.path, f.handler, f)]
    if state.kind != "file":
        if state.kind == "dir":
            reason = "a directory is in the way (not replaced automatically)"
            return [Action(ActionKind.UPDATE, res, f.domain, reason, "", f.path, f.handler, f)]
        diff = SECRET_DIFF if f.secret else text_diff(None, f.content, f.path)
        reason = f"is a {state.kind}, should be a regular file"
        return [Action(ActionKind.UPDATE, res, f.domain, reason, diff, f.path, f.handler, f)]
    if state.sha256 != _sha256(f.content):
        if f.secret:
            diff = SECRET_DIFF
        elif state.content is not None:
            diff = text_diff(state.content, f.content, f.path)
        else:
            diff = "(content differs; live content not fetched)"
        return [Action(ActionKind.UPDATE, res, f.domain, "content differs", diff, f.path, f.handler, f)]
    out: list[Action] = []
    if state.mode is not None and state.mode != f.mode:
        out.append(
            Action(
                ActionKind.CHMOD,
                res,
                f.domain,
                f"mode {state.mode:04o} should be {f.mode:04o}",
                "",
                f.path,
                f.handler,
                f,
            )
        )
    if (state.owner is not None and state.owner != f.owner) or (
        state.group is not None and state.group != f.group
    ):
        out.append(
            Action(
                ActionKind.CHOWN,
                res,
                f.domain,
                f"owner {state.owner}:{state.group} should be {f.owner}:{f.group}",
                "",
                f.path,
                f.handler,
                f,
            )
        )
    return out


def _plan_links(links: tuple[LinkResource, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for lk in links:
        state = observed.files.get(lk.path) or FileState(path=lk.path, exists=False)
        res = f"link {lk.path}"
        if state.refused:
            reason = refused_reason(state)
            out.append(Action(ActionKind.REFUSED, res, lk.domain, reason, "", lk.path, lk.handler, lk))
        elif not state.exists:
            out.append(
                Action(
                    ActionKind.CREATE,
                    res,
                    lk.domain,
                    f"missing (-> {lk.target})",
                    "",
                    lk.path,
                    lk.handler,
                    lk,
                )
            )
        elif state.kind != "link" or state.link_target != lk.target:
            was = f"-> {state.link_target}" if state.kind == "link" else f"a {state.kind}"
            if state.kind == "dir":
                reason = f"a directory is in the way of the link -> {lk.target} (not replaced automatically)"
            else:
                reason = f"is {was}, should be -> {lk.target}"
            out.append(Action(ActionKind.RELINK, res, lk.domain, reason, "", lk.path, lk.handler, lk))
    return out


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


def _plan_services(services: tuple[Service, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for s in services:
        if not s.running:
            continue
        state = observed.services.get(s.name)
        if state is not None and state.running:
            if s.enabled and state.enabled is False:
                out.append(
                    Action(
                        ActionKind.ENABLE_SERVICE,
                        f"service {s.name}",
                        s.domain,
                        "running, but not enabled at boot",
                        target=s,
                    )
                )
            continue
        reason = "not running" if state is not None else "not observed running"
        if s.enabled and state is not None and state.enabled is False:
            reason += ", not enabled at boot"
        out.append(Action(ActionKind.START_SERVICE, f"service {s.name}", s.domain, reason, target=s))
    return out


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


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
