"""Kind ``package``: the observation and the diff of declared packages (the apt/dpkg change
scripts are ``reconciler.kinds.packaging``; apt's own view of a planned transaction
``reconciler.kinds.aptsim``).

- observe (only with packages): ONE ``dpkg-query -W`` of the declared packages and of every
  package a resource needs (``needs_package``), and ``apt-cache policy`` only for the packages a
  Requirement names that are not installed (their install candidate);
- plan: install/purge actions, then (when the observation holds apt's simulation) what apt says
  they imply. The engine plans packages FIRST: its simulated post-install state decides which
  resources are planned (``reconciler.engine.plan``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType

from reconciler.host.script import ScriptBuilder
from reconciler.kinds import aptsim
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.aptsim import AptSimulation
from reconciler.kinds.kind import BaseKind, PlanStep, SectionReader
from reconciler.kinds.observed import Observed, PackageState
from reconciler.kinds.packaging import needed_packages
from reconciler.kinds.resources import Desired, Package

SHELL = r"""# dpkg-query, its answer kept in $_DPKG for apt_cand
dpkg_q() {
  _DPKG=$(dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n' -- "$@"); _rc=$?
  printf '%s\n' "$_DPKG"
  return "$_rc"
}
# the install candidate of each package that dpkg_q did not find installed ("" = none)
apt_cand() {
  for _p do
    case "
$_DPKG" in *"
$_p	ii"*) continue ;; esac
    _c=$(apt-cache policy -- "$_p" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | head -n 1)
    [ "$_c" = "(none)" ] && _c=
    printf '%s\t%s\n' "$_p" "$_c"
  done
}
"""


def observed_names(desired: Desired) -> tuple[str, ...]:
    """The packages whose state the observation asks dpkg for (sorted, unique)."""
    return tuple(sorted({*needed_packages(desired), *(p for r in desired.requires for p in r.packages)}))


def parse_dpkg(text: str, names: Iterable[str]) -> dict[str, PackageState]:
    found: dict[str, PackageState] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        name, abbrev, version = parts[0], parts[1], parts[2]
        installed = len(abbrev) >= 2 and abbrev[1] == "i"
        found[name] = PackageState(name=name, installed=installed, version=version if installed else None)
    out: dict[str, PackageState] = {}
    for n in names:
        base = n.split(":", 1)[0]
        out[n] = found.get(n) or found.get(base) or PackageState(name=n, installed=False)
    return out


def unmet_requirements(desired: Desired, observed: Observed) -> str:
    """Why the host cannot be reconciled at all ("" when it can): a Requirement whose package
    is not installed and has no install candidate in the host's apt (its own sources)."""
    for req in desired.requires:
        missing = [p for p in req.packages if p in observed.candidates and not observed.candidates[p]]
        if missing:
            return (
                f"{req.what} cannot run on this host: apt has no install candidate for "
                f"{', '.join(missing)} (apt-cache policy on the host; e.g. racoon and ipsec-tools are "
                "not packaged in Debian 12); nothing on this host was changed: choose another stack "
                "for it, or add an apt source that ships them"
            )
    return ""


def plan_packages(packages: tuple[Package, ...], observed: Observed) -> list[Action]:
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


def apt_solution(
    pkg_actions: list[Action], desired: Desired, sim: AptSimulation, errors: list[str], warnings: list[str]
) -> list[Action]:
    """What apt says the package actions imply (``apt-get -s``): shown on the actions; a removal
    that no role purges or ``replaces`` is a plan error with apt's line (nothing is applied)."""
    purged = {p.name for p in desired.packages if p.state == "purged"}
    replacing: dict[str, str] = {}  # replaced package -> the package that replaces it
    for a in pkg_actions:
        if a.kind is ActionKind.INSTALL_PACKAGE and isinstance(a.target, Package):
            for r in a.target.replaces:
                replacing.setdefault(r, a.target.name)
    for c in aptsim.refused_removals(sim, purged | set(replacing)):
        errors.append(
            f"packages: apt would remove {c.package} ({c.old_version}) to carry out the package changes "
            f"(apt-get -s: Remv {c.package}); no role purges it or lists it in replaces: not applied "
            f"(add `replaces: [{c.package}]` to the role whose package needs it, or purge it)"
        )
    for name, line in sim.not_found:
        warnings.append(
            f"package {name}: {line} (the apply runs apt-get update first; if it is still "
            "not found, it fails alone and the rest of the host is applied)"
        )
    for line in sim.errors:
        warnings.append(f"packages: apt-get -s: {line} (the apply installs package by package)")
    removed = {c.package.split(":")[0]: c for c in sim.removals}
    declared = {a.target.name for a in pkg_actions if isinstance(a.target, Package)}
    deps = [c.package for c in sim.installs if c.package.split(":")[0] not in declared]
    versions = {c.package.split(":")[0]: c for c in (*sim.installs, *sim.upgrades)}
    out: list[Action] = []
    first_install = True
    for a in pkg_actions:
        if not isinstance(a.target, Package):
            out.append(a)
            continue
        notes: list[str] = []
        name = a.target.name
        if name in versions and versions[name].version:
            notes.append(f"version {versions[name].version}")
        if a.kind is ActionKind.INSTALL_PACKAGE:
            gone = [r for r, by in replacing.items() if by == name and r in removed]
            if gone:
                notes.append(f"apt removes {', '.join(gone)} (replaces)")
            if first_install:
                first_install = False
                if deps:
                    notes.append(
                        f"apt also installs {len(deps)} dependencies ({', '.join(deps[:8])}"
                        + (", ..." if len(deps) > 8 else "")
                        + ")"
                    )
                if sim.upgrades:
                    notes.append("apt upgrades " + ", ".join(c.line() for c in sim.upgrades))
        out.append(replace(a, reason=f"{a.reason}; {'; '.join(notes)}") if notes else a)
    return out


class PackagesKind(BaseKind):
    name = "packages"
    shell = SHELL

    def wanted(self, desired: Desired) -> bool:
        return bool(observed_names(desired))

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        b.add(f"frame dpkg dpkg_q {b.refs(list(observed_names(desired)))}")
        required = sorted({p for r in desired.requires for p in r.packages})
        if required:
            b.add(f"frame aptcand apt_cand {b.refs(required)}")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        packages: dict[str, PackageState] = {}
        dpkg = read("dpkg", "dpkg-query", ok=(0, 1))
        if dpkg is not None:
            packages = parse_dpkg(dpkg, observed_names(desired))
        candidates: dict[str, str] = {}
        if any(r.packages for r in desired.requires):
            cand = read("aptcand", "apt-cache policy", required=False)
            for line in (cand or "").splitlines():
                name, _, version = line.partition("\t")
                if name:
                    candidates[name] = version.strip()
        return replace(observed, packages=MappingProxyType(packages), candidates=MappingProxyType(candidates))

    def plan(self, step: PlanStep) -> Sequence[Action]:
        """The package actions (the engine's first phase: ``kept`` is not known yet)."""
        actions = plan_packages(step.desired.packages, step.observed)
        if step.observed.apt is not None and actions:
            actions = apt_solution(actions, step.desired, step.observed.apt, step.errors, step.warnings)
        return actions


KIND = PackagesKind()
