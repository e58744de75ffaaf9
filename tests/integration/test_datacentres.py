"""The second example fleet (fleet-repo-datacentres: 7 hosts, 3 sites, links topology) on its lab,
with REAL Debian packages fetched through the lab's package path (reconciler/lab/aptproxy.py):
chrony replacing systemd-timesyncd, haproxy, mariadb-server (service ``mariadb``), the NRPE agent.

- the plan shows apt's solution (the replaced package, the dependencies) and runs no apt-get
  that changes anything;
- the FIRST apply converges every host (the conflict included), a second apply after the keys
  are collected converges the mesh, then a plan is a no-op and ``verify`` passes;
- a package that does not exist fails alone with apt's own line; the rest of the host converges
  and the host is reported as partly applied (exit 3);
- a package whose install would remove one the fleet installs is refused at plan time;
- the machine's own dpkg database never changes.

The mesh runs in tunnel mode over libipsec on the lab (the container kernel has no IP-IP and no
kernel ESP, docs/LAB.md); the fleet repo itself declares the seed's ipip/kernel datapath.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.keys import collect
from reconciler.engine.fleet import (
    APPLIED,
    ERROR,
    EXIT_PARTIAL,
    FAILED,
    IN_SYNC,
    PARTLY_APPLIED,
    FleetResult,
    plan_fleet,
    reconcile_fleet,
)
from reconciler.engine.planview import render_apply, render_plan
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.kinds.actions import ActionKind
from reconciler.lab import Lab, aptproxy, specs_from_fleet
from reconciler.verify import VerifyOptions, VerifyReport, verify_fleet

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 4.0


def _mirror_reachable() -> str | None:
    """Why the machine cannot reach its own apt mirror (then there is no package path), or None."""
    hosts = aptproxy.mirror_hosts()
    if not hosts:
        return "the machine has no http(s) apt source"
    try:
        socket.create_connection((hosts[0], 80), timeout=5).close()
    except OSError as err:
        return f"the machine cannot reach its apt mirror {hosts[0]}: {err}"
    return None


def _machine_dpkg() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n"], capture_output=True)
    return out.stdout.decode()


def _line(dpkg: str, pkg: str) -> str:
    return next((ln for ln in dpkg.splitlines() if ln.split(" ")[0] == pkg), f"{pkg} missing")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fleet") / "repo"
    shutil.copytree(ROOT / "fleet-repo-datacentres", dest)
    text = (dest / "fleet.yaml").read_text()
    text = text.replace("mode: ipip", "mode: tunnel").replace("datapath: kernel", "datapath: libipsec")
    (dest / "fleet.yaml").write_text(text)
    return dest


@pytest.fixture(scope="module")
def machine_dpkg() -> str:
    return _machine_dpkg()


@pytest.fixture(scope="module")
def lab(lab_factory: Any, repo: Path, machine_dpkg: str) -> Iterator[Lab]:
    why = _mirror_reachable()
    if why:
        pytest.skip(f"no package path for the lab: {why}")
    lab = lab_factory(specs_from_fleet(load_fleet(repo)), lock_timeout=3000)
    yield lab
    lab.down()


def pool_for(fleet: Fleet, lab: Lab) -> ConnectionPool:
    targets = targets_for(
        fleet, known_hosts=str(lab.info.known_hosts), client_keys=[str(lab.info.client_key)]
    )
    return ConnectionPool(targets, connect_timeout=10, command_timeout=900)


def run(fleet: Fleet, lab: Lab, *, apply: bool) -> FleetResult:
    async def main() -> FleetResult:
        async with pool_for(fleet, lab) as pool:
            return await reconcile_fleet(fleet, None, pool, apply=apply, firewall_window=WINDOW)

    return asyncio.run(main())


def sh(lab: Lab, host: str, script: str) -> str:
    res = lab.exec(host, ["sh", "-c", script], timeout=60)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def dpkg_state(lab: Lab, host: str, pkg: str) -> str:
    return sh(
        lab, host, f"dpkg-query -W -f='${{db:Status-Abbrev}}' {pkg} 2>/dev/null || echo missing"
    ).strip()


def test_plan_shows_apts_solution_and_changes_nothing(lab: Lab, repo: Path) -> None:
    fleet = load_fleet(repo)
    before = {
        h: sh(lab, h, "dpkg -l | md5sum; ls /var/cache/apt/archives | md5sum") for h in fleet.host_names()
    }

    async def main() -> FleetResult:
        async with pool_for(fleet, lab) as pool:
            return await plan_fleet(fleet, None, pool)

    result = asyncio.run(main())
    assert all(o.status != ERROR for o in result.hosts), [o.error for o in result.hosts]
    text = render_plan(result)
    db1 = next(o for o in result.hosts if o.host == "db1")
    assert db1.plan is not None
    reasons = {a.resource: a.reason for a in db1.plan.actions if a.kind is ActionKind.INSTALL_PACKAGE}
    assert "apt removes systemd-timesyncd (replaces)" in reasons["package chrony"], reasons
    assert any("apt also installs" in r for r in reasons.values()), reasons
    # the service waits for its package, not for a package named like it
    starts = [
        a for a in db1.plan.actions if a.kind is ActionKind.START_SERVICE and a.resource == "service mariadb"
    ]
    assert starts and starts[0].after_package == "mariadb-server", text
    after = {
        h: sh(lab, h, "dpkg -l | md5sum; ls /var/cache/apt/archives | md5sum") for h in fleet.host_names()
    }
    assert after == before


def test_first_apply_converges_with_the_conflict_then_noop_and_verify(
    lab: Lab, repo: Path, machine_dpkg: str
) -> None:
    fleet = load_fleet(repo)
    t0 = time.monotonic()
    first = run(fleet, lab, apply=True)
    took = time.monotonic() - t0
    for o in first.hosts:
        assert o.status == APPLIED, (o.host, o.error, o.result and o.result.messages)
        assert o.result is not None and o.result.converged, (o.host, o.result and o.result.messages)
    assert first.exit_code() == 0
    print(f"first apply of 7 hosts with real packages: {took:.1f} s")
    for h in fleet.host_names():
        assert dpkg_state(lab, h, "chrony") == "ii", h
        assert dpkg_state(lab, h, "systemd-timesyncd") != "ii", h
        assert "running" in sh(lab, h, "service chrony status; service nagios-nrpe-server status"), h
    assert dpkg_state(lab, "db1", "mariadb-server") == "ii"
    assert sh(lab, "db1", "mysqladmin ping 2>&1").strip() == "mysqld is alive"
    assert dpkg_state(lab, "lb1", "haproxy") == "ii" and dpkg_state(lab, "web1", "haproxy") != "ii"

    async def keys() -> None:
        async with pool_for(fleet, lab) as pool:
            results = await collect(fleet, [], pool, repo)
        assert all(ok for _, _, ok in results), results

    asyncio.run(keys())
    fleet = load_fleet(repo)
    second = run(fleet, lab, apply=True)  # the mesh, now that every key is known
    for o in second.hosts:
        assert o.status in (APPLIED, IN_SYNC), (o.host, o.error)
        assert o.result is None or not any(
            oc.action.kind is ActionKind.INSTALL_PACKAGE for oc in o.result.outcomes
        ), o.host
    again = run(fleet, lab, apply=False)
    assert [o.host for o in again.hosts if o.status != IN_SYNC] == [], render_plan(again)

    report = _verify_until_ok(fleet, lab)
    assert report.ok, [c.as_dict() for c in report.checks if c.status.value == "fail"][:5]
    # the machine's own packages: untouched by seven hosts installing and removing (compared by
    # name: other people on the machine may install unrelated packages meanwhile)
    now = _machine_dpkg()
    for pkg in ("chrony", "systemd-timesyncd", "haproxy", "mariadb-server", "nagios-nrpe-server"):
        assert _line(now, pkg) == _line(machine_dpkg, pkg), pkg


def _verify_until_ok(fleet: Fleet, lab: Lab, seconds: float = 120) -> VerifyReport:
    async def once() -> VerifyReport:
        async with pool_for(fleet, lab) as pool:
            return await verify_fleet(fleet, None, pool, options=VerifyOptions(datapath=False))

    deadline = time.monotonic() + seconds
    report = asyncio.run(once())
    while not report.ok and time.monotonic() < deadline:
        sys.stderr.write(f"verify: {len([c for c in report.checks if c.status.value == 'fail'])} failing\n")
        time.sleep(5)
        report = asyncio.run(once())
    return report


def test_a_missing_package_fails_alone_and_the_host_is_partly_applied(lab: Lab, repo: Path) -> None:
    role = repo / "roles" / "mon.yaml"
    saved = role.read_text()
    role.write_text(
        saved.replace(
            "packages: [monitoring-plugins-basic]", "packages: [monitoring-plugins-basic, nosuchpkg, tree]"
        )
    )
    motd = repo / "templates" / "motd.j2"
    saved_motd = motd.read_text()
    motd.write_text(saved_motd + "Site: {{ host.name }} watches the others.\n")
    try:
        fleet = load_fleet(repo)
        result = run(fleet, lab, apply=True)
        mon = next(o for o in result.hosts if o.host == "mon1")
        assert mon.status == FAILED and mon.partial and mon.outcome == PARTLY_APPLIED, mon.error
        assert mon.result is not None
        failed = {oc.action.resource: oc.message for oc in mon.result.outcomes if oc.status == "failed"}
        assert list(failed) == ["package nosuchpkg"], failed
        assert failed["package nosuchpkg"].startswith("E: Unable to locate package nosuchpkg"), failed
        assert dpkg_state(lab, "mon1", "tree") == "ii"
        assert "watches the others" in sh(lab, "mon1", "cat /etc/motd")
        others = [o for o in result.hosts if o.host != "mon1"]
        assert all(o.status == APPLIED for o in others), [(o.host, o.error) for o in others]
        assert result.exit_code() == EXIT_PARTIAL
        summary = render_apply(result).splitlines()[-1]
        done, total = mon.result.change_counts()
        assert summary == (
            f"Apply: 6 applied, 1 partly applied ({done} of {total} changes), 0 failed, 0 in sync, "
            "0 unreachable or in error"
        )
        assert mon.as_dict()["outcome"] == "partly applied"
        # what the daemon records for the host (its status and events show this message)
        assert (mon.error or "").startswith(f"partly applied: {done} of {total} changes; failed: ")
        assert "install-package package nosuchpkg: E: Unable to locate package nosuchpkg" in (mon.error or "")
    finally:
        role.write_text(saved)
        motd.write_text(saved_motd)


def test_an_install_that_would_remove_a_fleet_package_is_refused_at_plan(lab: Lab, repo: Path) -> None:
    role = repo / "roles" / "mon.yaml"
    saved = role.read_text()
    role.write_text(
        saved.replace("packages: [monitoring-plugins-basic]", "packages: [monitoring-plugins-basic, ntpsec]")
    )
    try:
        fleet = load_fleet(repo)
        result = run(fleet, lab, apply=True)
        mon = next(o for o in result.hosts if o.host == "mon1")
        assert mon.status == ERROR and mon.result is None, mon
        assert "apt would remove chrony" in (mon.error or ""), mon.error
        assert dpkg_state(lab, "mon1", "ntpsec") != "ii" and dpkg_state(lab, "mon1", "chrony") == "ii"
    finally:
        role.write_text(saved)
