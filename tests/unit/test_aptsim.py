"""Packages as apt sees them (pure and with a scripted fake host): ``apt-get -s`` parsed
(installs, upgrades, removals, apt's errors), the removal policy in the plan, purges before
installs, the package-by-package retry after a failed transaction, apt's own E: line, and the
outcome classification (partly applied, exit code, summary line)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from reconciler.engine import apply as apply_mod
from reconciler.engine.apply import ActionOutcome, ApplyResult
from reconciler.engine.fleet import APPLIED, EXIT_PARTIAL, FAILED, IN_SYNC, FleetResult, HostOutcome
from reconciler.engine.plan import plan_host
from reconciler.engine.planview import render_apply
from reconciler.kinds import packaging
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.aptsim import AptSimulation, parse_simulation, refused_removals
from reconciler.kinds.observed import Observed, PackageState, ServiceState
from reconciler.kinds.resources import Desired, Domain, Package, Service
from tests.unit.framed_output import frame_shorthand, sections_of

CHRONY_SIM = """@@SIM 0
NOTE: This is only a simulation!
Reading package lists...
The following packages will be REMOVED:
  systemd-timesyncd*
The following NEW packages will be installed:
  chrony
0 upgraded, 1 newly installed, 1 to remove and 0 not upgraded.
Purg systemd-timesyncd [252.39-1~deb12u2]
Inst chrony (4.3-2+deb12u3 Debian:12.15/oldstable [amd64])
Inst libperl5.36 [5.36.0-7+deb12u1] (5.36.0-7+deb12u2 Debian:12.15/oldstable [amd64])
Inst libsnmp40 (5.9.3+dfsg-2 Debian:12.15/oldstable [amd64])
Conf chrony (4.3-2+deb12u3 Debian:12.15/oldstable [amd64])
@@ENDSIM
"""

NOT_FOUND_SIM = """@@SIM 100
Reading package lists...
E: Unable to locate package nosuchpkg
@@ENDSIM
@@SIM 0
Inst tree (2.1.0-1 Debian:12.15/oldstable [amd64])
Conf tree (2.1.0-1 Debian:12.15/oldstable [amd64])
@@ENDSIM
"""

BROKEN_SIM = """@@SIM 100
The following packages have unmet dependencies:
 foo : Depends: libbar (>= 2) but it is not going to be installed
E: Unable to correct problems, you have held broken packages.
@@ENDSIM
"""


def test_simulation_lists_installs_upgrades_and_removals() -> None:
    sim = parse_simulation(sections_of(CHRONY_SIM))
    assert sim.ok
    assert [(c.package, c.version) for c in sim.installs] == [
        ("chrony", "4.3-2+deb12u3"),
        ("libsnmp40", "5.9.3+dfsg-2"),
    ]
    assert [c.line() for c in sim.upgrades] == ["libperl5.36 5.36.0-7+deb12u1 -> 5.36.0-7+deb12u2"]
    assert [(c.package, c.old_version) for c in sim.removals] == [("systemd-timesyncd", "252.39-1~deb12u2")]
    assert sim.summary() == (
        "apt-get -s: 2 to install, 1 to upgrade (libperl5.36), 1 to remove (systemd-timesyncd)"
    )


def test_simulation_keeps_apts_line_for_a_package_it_cannot_find_and_solves_the_rest() -> None:
    sim = parse_simulation(sections_of(NOT_FOUND_SIM))
    assert sim.ok and sim.not_found == (("nosuchpkg", "E: Unable to locate package nosuchpkg"),)
    assert [c.package for c in sim.installs] == ["tree"]


def test_simulation_errors_and_a_script_that_did_not_run() -> None:
    sim = parse_simulation(sections_of(BROKEN_SIM))
    assert not sim.ok and sim.errors == ("E: Unable to correct problems, you have held broken packages.",)
    dead = parse_simulation({}, "sh: 1: apt-get: not found\n")
    assert not dead.ran and not dead.ok and "apt-get: not found" in dead.errors[0]


def test_removal_policy_allows_only_purged_or_replaced_packages() -> None:
    sim = parse_simulation(sections_of(CHRONY_SIM))
    assert [c.package for c in refused_removals(sim, [])] == ["systemd-timesyncd"]
    assert refused_removals(sim, ["systemd-timesyncd"]) == ()
    arch = AptSimulation(
        removals=parse_simulation(sections_of("@@SIM 0\nRemv libc6:i386 [2.36]\n@@ENDSIM\n")).removals
    )
    assert refused_removals(arch, ["libc6"]) == ()


# ---------------------------------------------------------------- plan


def _desired(*, replaces: tuple[str, ...] = (), purge: bool = False) -> Desired:
    pkgs = [Package("chrony", replaces=replaces)]
    if purge:
        pkgs.append(Package("systemd-timesyncd", state="purged"))
    return Desired(
        host="h1",
        packages=tuple(pkgs),
        services=(Service("chrony", start=("service", "chrony", "start"), needs_package="chrony"),),
    )


def _observed(sim: AptSimulation | None) -> Observed:
    return Observed(
        host="h1",
        packages=MappingProxyType(
            {
                "chrony": PackageState("chrony", False),
                "systemd-timesyncd": PackageState("systemd-timesyncd", True),
            }
        ),
        services=MappingProxyType({"chrony": ServiceState("chrony", False)}),
        init_system="sysv",
        apt=sim,
    )


def test_plan_refuses_a_removal_no_role_allows_with_apts_line() -> None:
    plan = plan_host(_desired(), _observed(parse_simulation(sections_of(CHRONY_SIM))))
    assert len(plan.errors) == 1
    err = plan.errors[0]
    assert err.startswith("packages: apt would remove systemd-timesyncd (252.39-1~deb12u2)")
    assert "Remv systemd-timesyncd" in err and "replaces: [systemd-timesyncd]" in err


def test_plan_shows_the_replaced_package_the_dependencies_and_the_upgrades() -> None:
    plan = plan_host(
        _desired(replaces=("systemd-timesyncd",)), _observed(parse_simulation(sections_of(CHRONY_SIM)))
    )
    assert plan.errors == ()
    install = next(a for a in plan.actions if a.kind is ActionKind.INSTALL_PACKAGE)
    assert "version 4.3-2+deb12u3" in install.reason
    assert "apt removes systemd-timesyncd (replaces)" in install.reason
    assert "apt also installs 1 dependencies (libsnmp40)" in install.reason
    assert "apt upgrades libperl5.36 5.36.0-7+deb12u1 -> 5.36.0-7+deb12u2" in install.reason


def test_a_purge_allows_the_removal_and_no_simulation_means_no_opinion() -> None:
    plan = plan_host(_desired(purge=True), _observed(parse_simulation(sections_of(CHRONY_SIM))))
    assert plan.errors == ()
    kinds = [a.kind for a in plan.actions if a.domain is Domain.PACKAGES]
    assert ActionKind.PURGE_PACKAGE in kinds and ActionKind.INSTALL_PACKAGE in kinds
    assert plan_host(_desired(), _observed(None)).errors == ()


def test_a_package_apt_cannot_find_is_a_warning_not_an_error() -> None:
    sim = parse_simulation(sections_of(NOT_FOUND_SIM))
    desired = Desired(host="h1", packages=(Package("nosuchpkg"), Package("tree")))
    observed = Observed(
        host="h1",
        packages=MappingProxyType({n: PackageState(n, False) for n in ("nosuchpkg", "tree")}),
        apt=sim,
    )
    plan = plan_host(desired, observed)
    assert plan.errors == ()
    assert any(
        w.startswith("package nosuchpkg: E: Unable to locate package nosuchpkg") for w in plan.warnings
    )


def test_service_tied_to_a_package_nothing_installs_is_a_plan_error_naming_both() -> None:
    desired = Desired(
        host="h1",
        services=(Service("mariadb", start=("service", "mariadb", "start"), needs_package="mariadb-server"),),
    )
    observed = Observed(
        host="h1",
        packages=MappingProxyType({"mariadb-server": PackageState("mariadb-server", False)}),
        services=MappingProxyType({"mariadb": ServiceState("mariadb", False)}),
    )
    plan = plan_host(desired, observed)
    assert plan.actions == ()
    assert plan.errors and plan.errors[0].startswith("service mariadb: needs package mariadb-server")


# ---------------------------------------------------------------- apply, with a scripted host


@dataclass
class _Res:
    exit_status: int = 0
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class ScriptedHost:
    """Answers the apt script by its arguments: (verb, packages) -> output."""

    answers: dict[tuple[str, tuple[str, ...]], str]
    host: str = "h1"
    calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> _Res:
        raise AssertionError(f"unexpected command {argv}")

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> _Res:
        verb, nallow = args[0], int(args[3])
        allow, pkgs = tuple(args[4 : 4 + nallow]), tuple(args[4 + nallow :])
        self.calls.append((verb, allow, pkgs))
        nonce = (stdin_after or b"").split(b"\n", 1)[0].decode()
        return _Res(stdout=frame_shorthand(self.answers[(verb, pkgs)], nonce))


FAILED_TRANSACTION = (
    "@@APT failed 100\n@@PKG tree un \n@@PKG foo un \n@@LOG\n"
    "E: Unable to correct problems, you have held broken packages.\n@@ENDLOG\n"
)


def test_a_failed_transaction_is_retried_package_by_package_with_apts_own_line() -> None:
    host = ScriptedHost(
        {
            ("install", ("foo", "tree")): FAILED_TRANSACTION,
            ("install", ("foo",)): (
                "@@APT failed 100\n@@PKG foo un \n@@LOG\n foo : Depends: libbar (>= 2)\n"
                "E: Unable to correct problems, you have held broken packages.\n@@ENDLOG\n"
            ),
            ("install", ("tree",)): "@@APT ok\n@@PKG tree ii \n",
        }
    )
    run = asyncio.run(packaging.apt(host, "install", ["foo", "tree"]))
    assert [c[2] for c in host.calls] == [("foo", "tree"), ("foo",), ("tree",)]
    assert run.done == ("tree",) and not run.ok and run.retried == ("foo", "tree")
    ((name, why),) = run.failed
    assert name == "foo"
    assert why.startswith(
        "apt-get install failed (exit 100): E: Unable to correct problems, you have held broken packages."
    )
    assert "tried alone: foo tree" in run.summary()


def test_a_lock_is_not_retried_package_by_package() -> None:
    locked = (
        "@@APT failed 100\n@@PKG aa un \n@@PKG bb un \n@@LOG\n"
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 42 (apt-get)\n@@ENDLOG\n"
    )
    host = ScriptedHost({("install", ("aa", "bb")): locked})
    run = asyncio.run(packaging.apt(host, "install", ["aa", "bb"]))
    assert len(host.calls) == 1 and run.lock is not None and run.lock.pid == 42


class _Pool:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def get(self, host: str) -> Any:
        return self.conn


def test_apply_purges_before_it_installs_and_passes_the_allowed_removals() -> None:
    chrony = Package("chrony", replaces=("systemd-timesyncd",))
    ntp = Package("ntp", state="purged")
    actions = (
        Action(ActionKind.INSTALL_PACKAGE, "package chrony", Domain.PACKAGES, "not installed", target=chrony),
        Action(ActionKind.PURGE_PACKAGE, "package ntp", Domain.PACKAGES, "purged", target=ntp),
    )
    host = ScriptedHost(
        {
            ("purge", ("ntp",)): "@@APT ok\n@@PKG ntp pn \n",
            ("install", ("chrony",)): "@@APT ok\n@@PKG chrony ii \n",
        }
    )
    run = apply_mod.HostRun(_Pool(host), "h1", HostPlan(host="h1", actions=actions), Desired(host="h1"), "t")  # type: ignore[arg-type]
    asyncio.run(apply_mod._packages(run))
    assert host.calls == [("purge", (), ("ntp",)), ("install", ("systemd-timesyncd",), ("chrony",))]
    assert {o.status for o in run.outcomes.values()} == {"done"}


# ---------------------------------------------------------------- outcomes


def _result(host: str, statuses: Sequence[str]) -> ApplyResult:
    outcomes = tuple(
        ActionOutcome(Action(ActionKind.INSTALL_PACKAGE, f"package p{i}", Domain.PACKAGES, "x"), s, "why")
        for i, s in enumerate(statuses)
    )
    ok = all(s == "done" for s in statuses)
    return ApplyResult(host, ok, outcomes, converged=ok)


def test_outcomes_applied_partly_applied_failed_in_sync() -> None:
    hosts = (
        HostOutcome("a", APPLIED, result=_result("a", ["done", "done"])),
        HostOutcome("b", FAILED, result=_result("b", ["done", "done", "done", "failed", "skipped"])),
        HostOutcome("c", IN_SYNC),
    )
    fleet = FleetResult(hosts)
    assert [h.outcome for h in hosts] == ["applied", "partly applied", "in sync"]
    assert fleet.exit_code() == EXIT_PARTIAL
    assert render_apply(fleet).splitlines()[-1] == (
        "Apply: 1 applied, 1 partly applied (3 of 5 changes), 0 failed, 1 in sync, 0 unreachable or in error"
    )
    doc = hosts[1].as_dict()
    assert doc["outcome"] == "partly applied" and (doc["changes_applied"], doc["changes_total"]) == (3, 5)
    nothing = HostOutcome("d", FAILED, result=_result("d", ["failed", "skipped"]))
    assert nothing.outcome == "failed" and FleetResult((*hosts, nothing)).exit_code() == 1


def test_an_untied_service_the_host_does_not_know_is_a_plan_error_not_an_apply_failure() -> None:
    generic = Service(
        "mariadb", start=("service", "mariadb", "start"), status=("service", "mariadb", "status")
    )
    desired = Desired(host="h1", services=(generic,))
    unknown = Observed(
        host="h1",
        services=MappingProxyType({"mariadb": ServiceState("mariadb", False, None)}),  # rc none
        init_system="sysv",
    )
    plan = plan_host(desired, unknown)
    assert plan.actions == ()
    assert plan.errors == (
        "service mariadb: the host has no init script or unit for it and no package is tied to it; not "
        "planned (name the package that brings it: {name: mariadb, package: PACKAGE})",
    )
    known = Observed(
        host="h1",
        services=MappingProxyType({"mariadb": ServiceState("mariadb", False, False)}),  # script, no links
        init_system="sysv",
    )
    assert [a.kind for a in plan_host(desired, known).actions] == [ActionKind.START_SERVICE]
