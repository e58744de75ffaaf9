"""Packages and services on real lab hosts, with a real local apt repository (no network).

Tiny packages are built from tests/fixtures/debs with ``dpkg-deb --build``, indexed with
``dpkg-scanpackages`` and served inside each lab host as ``deb [trusted=yes] file:/srv/aptrepo ./``
(the host's only apt source: the machine's sources are removed from the host's overlay, and a
lab host has no route out anyway). apt-get and dpkg really run; the lab host's /var is an overlay,
so the machine's own dpkg database is never touched (checked at the end).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from reconciler.domains.render import render_host
from reconciler.engine.apply import ApplyResult, apply_host
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.engine.planview import _Paint, render_host_plan
from reconciler.fleet.model import FirewallPolicy, Fleet, Host, ManagedFile, Mesh, Role
from reconciler.host.connection import ConnectionPool, SshTarget
from reconciler.kinds.actions import ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Domain, FileResource, Package
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DEBS = Path(__file__).resolve().parents[1] / "fixtures" / "debs"
HOSTS = {"pk1": "192.0.2.51", "pk2": "192.0.2.52", "pk3": "192.0.2.53"}
SOURCE = "deb [trusted=yes] file:/srv/aptrepo ./\n"
HELLO_CONF = "greeting=hello from the fleet\n"


def build_repo(dest: Path) -> Path:
    """Build every package under tests/fixtures/debs and index them: a flat apt repository."""
    repo = dest / "aptrepo"
    repo.mkdir(parents=True)
    for src in sorted(p for p in DEBS.iterdir() if (p / "DEBIAN" / "control").is_file()):
        tree = dest / "build" / src.name
        shutil.copytree(src, tree, ignore=shutil.ignore_patterns("DIRS"))
        dirs = src / "DIRS"
        for d in dirs.read_text().split() if dirs.is_file() else ():
            (tree / d).mkdir(parents=True, exist_ok=True)
        for p in tree.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        for script in ("preinst", "postinst", "prerm", "postrm"):
            if (tree / "DEBIAN" / script).exists():
                (tree / "DEBIAN" / script).chmod(0o755)
        subprocess.run(
            [
                "dpkg-deb",
                "--root-owner-group",
                "-Zgzip",
                "--build",
                str(tree),
                str(repo / f"{src.name}_1.0_all.deb"),
            ],
            check=True,
            capture_output=True,
        )
    index = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."], cwd=repo, check=True, capture_output=True
    )
    (repo / "Packages").write_bytes(index.stdout)
    return repo


def sh(lab: Lab, host: str, script: str, timeout: float = 60) -> str:
    res = lab.exec(host, ["sh", "-c", script], timeout=timeout)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def machine_dpkg() -> str:
    return hashlib.sha256(Path("/var/lib/dpkg/status").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def machine_before() -> str:
    return machine_dpkg()


@pytest.fixture(scope="module")
def lab(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory, machine_before: str) -> Iterator[Lab]:
    repo = build_repo(tmp_path_factory.mktemp("debs"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(repo, arcname="aptrepo")
    lab = lab_factory([LabHostSpec(n, a) for n, a in HOSTS.items()], lock_timeout=3000)
    for name in HOSTS:
        res = lab.exec(name, ["tar", "-x", "-C", "/srv", "-f", "-"], input=buf.getvalue())
        assert res.returncode == 0, res.stderr
        # the host's only apt source is the local repository (in the host's own overlay)
        res = lab.exec(
            name,
            [
                "sh",
                "-c",
                "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* && "
                "cat > /etc/apt/sources.list.d/rcl-test.list",
            ],
            input=SOURCE.encode(),
        )
        assert res.returncode == 0, res.stderr
    yield lab
    lab.down()


def pool_for(lab: Lab) -> ConnectionPool:
    targets = {
        h.name: SshTarget(
            host=h.name,
            address=h.address,
            known_hosts=str(lab.info.known_hosts),
            client_keys=(str(lab.info.client_key),),
        )
        for h in lab.info.hosts
    }
    return ConnectionPool(targets, connect_timeout=10.0, command_timeout=120.0)


def hello_fleet(host: str) -> Fleet:
    """A role with a package, its service and a managed file that depends on the package."""
    role = Role(name="hello", packages=("rcl-hello",), services=("rcl-hello",), files=("hello-conf",))
    conf = ManagedFile(
        name="hello-conf",
        path="/etc/rcl-hello/hello.conf",
        content=HELLO_CONF,
        validate=("rcl-hello", "--check", "{path}"),  # the validator comes with the package
        package="rcl-hello",
    )
    return Fleet(
        name="pk",
        mesh=Mesh(IPv4Network("10.99.0.0/24")),
        firewall=FirewallPolicy(management_sources=(IPv4Network("192.0.2.254/32"),)),
        hosts=(Host(host, IPv4Address(HOSTS[host]), IPv4Address("10.99.0.51"), roles=("hello",)),),
        roles=MappingProxyType({"hello": role}),
        files=MappingProxyType({"hello-conf": conf}),
    )


def hello_desired(host: str) -> Desired:
    """The rendered host, without the firewall (its dead-man window is tested elsewhere)."""
    d = render_host(hello_fleet(host), hello_fleet(host).host(host))
    return dataclasses.replace(
        d,
        firewall=None,
        files=tuple(f for f in d.files if f.domain is not Domain.FIREWALL),
        links=tuple(lk for lk in d.links if lk.domain is not Domain.FIREWALL),
    )


async def plan_of(pool: ConnectionPool, host: str, desired: Desired) -> HostPlan:
    return plan_host(desired, await observe_host(await pool.get(host), desired))


async def converge(pool: ConnectionPool, host: str, desired: Desired) -> tuple[HostPlan, ApplyResult]:
    plan = await plan_of(pool, host, desired)
    return plan, await apply_host(pool, host, plan, desired)


def outcome(result: ApplyResult, resource: str, kind: ActionKind | None = None) -> Any:
    for o in result.outcomes:
        if o.action.resource == resource and (kind is None or o.action.kind is kind):
            return o
    raise AssertionError(f"no outcome for {resource}: {[o.action.resource for o in result.outcomes]}")


# ---------------------------------------------------------------- install, no-op, plan


async def test_plan_on_a_bare_host_shows_the_install_and_the_dependent_file_and_service(lab: Lab) -> None:
    desired = hello_desired("pk1")
    async with pool_for(lab) as pool:
        plan = await plan_of(pool, "pk1", desired)
    text = "\n".join(render_host_plan(plan, _Paint(False)))
    print(text)
    assert not plan.errors, plan.errors
    kinds = [(a.kind, a.resource) for a in plan.actions]
    assert kinds[0] == (ActionKind.INSTALL_PACKAGE, "package rcl-hello")
    conf = next(a for a in plan.actions if a.resource == "file /etc/rcl-hello/hello.conf")
    assert conf.kind is ActionKind.CREATE and conf.after_package == "rcl-hello"
    assert "+greeting=hello from the fleet" in conf.diff  # the whole content, as if installed
    assert "validated after the install (rcl-hello --check)" in conf.reason
    svc = next(a for a in plan.actions if a.resource == "service rcl-hello")
    assert svc.kind is ActionKind.START_SERVICE and svc.after_package == "rcl-hello"
    assert kinds.index((ActionKind.INSTALL_PACKAGE, "package rcl-hello")) < kinds.index(
        (ActionKind.CREATE, "file /etc/rcl-hello/hello.conf")
    )
    # planning changed nothing: not installed, no lists fetched
    assert "rcl-hello" not in sh(
        lab, "pk1", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-hello 2>&1 | grep ii"
    )
    assert not sh(lab, "pk1", "ls /var/lib/apt/lists | grep -i aptrepo")


async def test_apply_installs_first_then_validates_and_writes_the_file_then_starts_the_service(
    lab: Lab,
) -> None:
    desired = hello_desired("pk1")
    async with pool_for(lab) as pool:
        started = time.monotonic()
        plan, result = await converge(pool, "pk1", desired)
        seconds = time.monotonic() - started
    print(f"bare host -> installed, configured, running in {seconds:.1f} s; messages: {result.messages}")
    assert result.ok and result.converged, result.messages
    assert outcome(result, "package rcl-hello").status == "done"
    assert outcome(result, "file /etc/rcl-hello/hello.conf").status == "done"
    # the package's validator really ran (it exists only after the install): not skipped
    assert not any("validator skipped" in m for m in result.messages), result.messages
    assert sh(lab, "pk1", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-hello") == "ii "
    assert sh(lab, "pk1", "cat /etc/rcl-hello/hello.conf") == HELLO_CONF
    assert sh(lab, "pk1", "rcl-hello") == "hello from the fleet\n"
    # enabled (update-rc.d: start links) and running (init script status)
    assert "S01rcl-hello" in sh(lab, "pk1", "ls /etc/rc2.d")
    assert sh(lab, "pk1", "service rcl-hello status >/dev/null 2>&1 && echo running") == "running\n"
    # apt-get update ran only for the local source (the package had no candidate before)
    assert sh(lab, "pk1", "ls /var/lib/apt/lists | grep -c aptrepo").strip() != "0"


async def test_second_run_is_a_noop(lab: Lab) -> None:
    desired = hello_desired("pk1")
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "pk1", desired)
    assert plan.actions == (), [(a.kind, a.resource, a.reason) for a in plan.actions]
    assert result.ok and result.changed() == 0 and result.reloaded == ()
    assert "in sync" in plan.noop_reason


async def test_service_that_fails_to_start_is_reported_with_its_log(lab: Lab) -> None:
    base = hello_desired("pk1")
    conf = FileResource(
        "/etc/rcl-hello/hello.conf",
        (HELLO_CONF + "start=fail\n").encode(),
        Domain.FILES,
        needs_package="rcl-hello",
    )
    svc = dataclasses.replace(base.services[0], log_path="/var/log/rcl-hello.log")
    desired = dataclasses.replace(
        base,
        files=tuple(conf if f.path == conf.path else f for f in base.files),
        services=(svc,),
    )
    sh(lab, "pk1", "service rcl-hello stop")
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "pk1", desired)
    assert (ActionKind.START_SERVICE, "service rcl-hello") in [(a.kind, a.resource) for a in plan.actions]
    assert not result.ok
    start = outcome(result, "service rcl-hello")
    assert start.status == "failed"
    assert "rcl-hello failed to start (service rcl-hello start: exit 1)" in start.message
    assert "last lines of /var/log/rcl-hello.log" in start.message
    assert "refusing to start: start=fail" in start.message  # the log's own words
    # put it back for the other tests
    async with pool_for(lab) as pool:
        _, again = await converge(pool, "pk1", hello_desired("pk1"))
    assert again.ok and again.converged, again.messages


# ---------------------------------------------------------------- a failing postinst


async def test_postinst_failure_holds_back_its_dependent_files_with_a_clear_report(lab: Lab) -> None:
    sh(lab, "pk2", "printf 'old\\n' > /etc/rcl-dep.conf")
    desired = Desired(
        host="pk2",
        packages=(Package("rcl-broken"), Package("rcl-hello")),
        files=(
            FileResource("/etc/rcl-broken/broken.conf", b"new\n", Domain.FILES, needs_package="rcl-broken"),
            FileResource("/etc/rcl-dep.conf", b"new\n", Domain.FILES, needs_package="rcl-broken"),
            FileResource(
                "/etc/rcl-hello/hello.conf", HELLO_CONF.encode(), Domain.FILES, needs_package="rcl-hello"
            ),
            FileResource("/etc/rcl-independent.conf", b"independent\n", Domain.FILES),
        ),
    )
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "pk2", desired)
    report = "\n".join(result.messages)
    print(report)
    assert not result.ok
    broken = outcome(result, "package rcl-broken")
    assert broken.status == "failed" and "half-configured (a maintainer script failed)" in broken.message
    # the package named, and the tail of dpkg's own output
    assert "apt-get install rcl-broken rcl-hello failed" in report
    assert "post-installation script subprocess returned error exit status 1" in report
    assert "rcl-broken: postinst failing on purpose" in report
    assert "package rcl-broken did not install: 2 dependent change(s) not applied" in report
    # its dependents were not applied: a new file not created, an old one not replaced
    for path in ("/etc/rcl-broken/broken.conf", "/etc/rcl-dep.conf"):
        o = outcome(result, f"file {path}")
        assert o.status == "skipped" and "package rcl-broken did not install" in o.message
    assert sh(lab, "pk2", "test -e /etc/rcl-broken/broken.conf || echo absent") == "absent\n"
    assert sh(lab, "pk2", "cat /etc/rcl-dep.conf") == "old\n"
    assert sh(lab, "pk2", "ls -a /etc | grep -c reconciler || true").strip() == "0"  # no temps left
    # the package that did install, its file, and the independent file are applied
    assert outcome(result, "package rcl-hello").status == "done"
    assert sh(lab, "pk2", "cat /etc/rcl-hello/hello.conf") == HELLO_CONF
    assert sh(lab, "pk2", "cat /etc/rcl-independent.conf") == "independent\n"
    # nothing recorded as converged: the next plan still wants the package and its files
    async with pool_for(lab) as pool:
        again = await plan_of(pool, "pk2", desired)
    assert {a.resource for a in again.actions} >= {
        "package rcl-broken",
        "file /etc/rcl-broken/broken.conf",
        "file /etc/rcl-dep.conf",
    }


# ---------------------------------------------------------------- a held dpkg lock


def hello_only(host: str) -> Desired:
    return Desired(
        host=host,
        packages=(Package("rcl-hello"),),
        files=(
            FileResource(
                "/etc/rcl-hello/hello.conf", HELLO_CONF.encode(), Domain.FILES, needs_package="rcl-hello"
            ),
        ),
    )


async def wait_for(lab: Lab, host: str, path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sh(lab, host, f"test -e {path} && echo yes") == "yes\n":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{path} did not appear on {host}: {sh(lab, host, 'cat /run/bg.log')}")


async def test_dpkg_lock_held_by_another_apt_run_is_reported_and_retried_later(lab: Lab) -> None:
    # another apt-get (say, an unattended upgrade) is in the middle of a postinst
    sh(
        lab,
        "pk3",
        "setsid -f sh -c 'apt-get -q update && "
        "DEBIAN_FRONTEND=noninteractive apt-get -y -q install rcl-slow; "
        "touch /run/bg.done' </dev/null >/run/bg.log 2>&1",
    )
    await wait_for(lab, "pk3", "/run/rcl-slow.started", 90)
    desired = hello_only("pk3")
    try:
        async with pool_for(lab) as pool:
            started = time.monotonic()
            plan, result = await converge(pool, "pk3", desired)
            seconds = time.monotonic() - started
    finally:
        sh(lab, "pk3", "touch /run/rcl-slow.release")
    print(f"locked apply returned in {seconds:.1f} s: {result.messages}")
    assert not result.ok
    install = outcome(result, "package rcl-hello")
    assert install.status == "failed"
    assert "dpkg is locked by another process (pid " in install.message
    assert "apt-get" in install.message and "will retry" in install.message
    assert result.transient and "dpkg is locked" in result.transient[0]
    assert any(m.startswith("will retry later: dpkg is locked") for m in result.messages)
    assert outcome(result, "file /etc/rcl-hello/hello.conf").status == "skipped"
    assert sh(lab, "pk3", "test -e /etc/rcl-hello/hello.conf || echo absent") == "absent\n"
    assert seconds < 30  # reported at once, not waited for
    # later, when the other run finished: the retry converges
    await wait_for(lab, "pk3", "/run/bg.done", 90)
    async with pool_for(lab) as pool:
        _, retry = await converge(pool, "pk3", desired)
    assert retry.ok and retry.converged, retry.messages
    assert sh(lab, "pk3", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-slow rcl-hello") == "ii ii "


async def test_a_flock_holder_on_the_frontend_lock_is_reported_too(lab: Lab) -> None:
    # flock(1) takes a flock(2) lock, which apt's own fcntl locking does not see: our pre-check does
    pid = sh(
        lab,
        "pk3",
        "flock /var/lib/dpkg/lock-frontend sleep 60 </dev/null >/dev/null 2>&1 & echo $!",
    ).strip()
    assert pid.isdigit()
    desired = Desired(host="pk3", packages=(Package("rcl-hello", state="purged"),))
    try:
        async with pool_for(lab) as pool:
            plan, result = await converge(pool, "pk3", desired)
    finally:  # flock(1) and the sleep it runs (which inherited the locked descriptor)
        lab.exec("pk3", ["sh", "-c", 'pkill -P "$1"; kill "$1"', "sh", pid])
    assert (ActionKind.PURGE_PACKAGE, "package rcl-hello") in [(a.kind, a.resource) for a in plan.actions]
    assert not result.ok and result.transient
    assert "dpkg is locked by another process [/var/lib/dpkg/lock-frontend]" in result.transient[0]
    assert sh(lab, "pk3", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-hello") == "ii "


async def test_purge_only_when_the_fleet_says_so(lab: Lab) -> None:
    desired = Desired(host="pk3", packages=(Package("rcl-hello", state="purged"),))
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "pk3", desired)
    assert (ActionKind.PURGE_PACKAGE, "package rcl-hello") in [(a.kind, a.resource) for a in plan.actions]
    assert result.ok and result.converged, result.messages
    state = sh(lab, "pk3", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-hello 2>/dev/null")
    assert state[:2] in ("", "pn", "un"), state  # purged: forgotten by dpkg, config files too
    assert sh(lab, "pk3", "test -e /usr/bin/rcl-hello || echo gone") == "gone\n"
    # rcl-slow was not named: still installed (no autoremove, no collateral removal)
    assert sh(lab, "pk3", "dpkg-query -W -f='${db:Status-Abbrev}' rcl-slow") == "ii "


def test_the_machines_own_dpkg_database_is_untouched(lab: Lab, machine_before: str) -> None:
    assert machine_dpkg() == machine_before
    res = subprocess.run(["dpkg-query", "-W", "rcl-hello"], capture_output=True, check=False)
    assert res.returncode != 0  # never installed on the machine itself
    assert not Path("/etc/rcl-hello").exists() and not Path("/usr/bin/rcl-hello").exists()
