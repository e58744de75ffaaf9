"""Packages and services in the plan (pure): the plan is computed against the state after its own
installs; apt/dpkg output is parsed into clear reports; a managed file's package flows from
the fleet model to the plan."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

from reconciler.domains import packages as packages_domain
from reconciler.domains.render import render_host
from reconciler.engine.plan import plan_host
from reconciler.fleet.model import FirewallPolicy, Fleet, Host, ManagedFile, Mesh, Role
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.observed import FileState, Observed, PackageState, ServiceState
from reconciler.kinds.packaging import needed_packages, parse_apt_output, parse_lock
from reconciler.kinds.resources import (
    Desired,
    Domain,
    FileResource,
    Handler,
    LinkResource,
    Package,
    Service,
    Validator,
)
from reconciler.kinds.services import parse_service
from tests.unit.framed_output import sections_of

SITE = b"<VirtualHost *:80>\n  ServerName shop.example.com\n</VirtualHost>\n"
APACHE = Handler(
    name="apache2",
    validators=(
        Validator(
            argv=("apache2ctl", "-t"),
            tree_root="/etc/apache2",
            env=(("APACHE_CONFDIR", "{tree}"),),
            needs_command="apache2ctl",
        ),
    ),
    reload=("apache2ctl", "graceful"),
)
HELLO_CHECK = Validator(argv=("rcl-hello", "--check", "{path}"), needs_command="rcl-hello")


def web_desired(*, purge_apache: bool = False) -> Desired:
    pkgs = [Package("libapache2-mod-jk"), Package("rcl-hello")]
    pkgs.append(Package("apache2", state="purged") if purge_apache else Package("apache2"))
    return Desired(
        host="web1",
        packages=tuple(sorted(pkgs, key=lambda p: p.name)),
        files=(
            FileResource(
                "/etc/apache2/sites-available/shop.conf",
                SITE,
                Domain.APACHE,
                handler="apache2",
                needs_package="apache2",
            ),
            FileResource("/etc/motd", b"hello\n", Domain.FILES),
            FileResource(
                "/etc/rcl-hello/hello.conf",
                b"greeting=hi\n",
                Domain.FILES,
                validators=(HELLO_CHECK,),
                needs_package="rcl-hello",
            ),
        ),
        links=(
            LinkResource(
                "/etc/apache2/sites-enabled/shop.conf",
                "../sites-available/shop.conf",
                Domain.APACHE,
                handler="apache2",
                needs_package="apache2",
            ),
        ),
        handlers=(APACHE,),
        services=(
            Service(
                "apache2",
                start=("apache2ctl", "start"),
                status=("true",),
                needs_package="apache2",
            ),
        ),
    )


def bare(installed: tuple[str, ...] = (), **kw: object) -> Observed:
    names = ("apache2", "libapache2-mod-jk", "rcl-hello")
    pkgs = {n: PackageState(n, n in installed, "1.0" if n in installed else None) for n in names}
    base: dict[str, object] = {
        "host": "web1",
        "files": MappingProxyType(
            {p: FileState(p, exists=False) for p in ("/etc/motd", "/etc/rcl-hello/hello.conf")}
        ),
        "packages": MappingProxyType(pkgs),
        "services": MappingProxyType({"apache2": ServiceState("apache2", running=False, enabled=None)}),
        "init_system": "sysv",
    }
    base.update(kw)
    return Observed(**base)  # type: ignore[arg-type]


def test_bare_host_plan_installs_first_and_plans_dependents_as_if_installed() -> None:
    plan = plan_host(web_desired(), bare())
    kinds = [(a.kind, a.resource) for a in plan.actions]
    # the installs come first, in one packages phase
    assert kinds[:3] == [
        (ActionKind.INSTALL_PACKAGE, "package apache2"),
        (ActionKind.INSTALL_PACKAGE, "package libapache2-mod-jk"),
        (ActionKind.INSTALL_PACKAGE, "package rcl-hello"),
    ]
    by = {a.resource: a for a in plan.actions}
    site = by["file /etc/apache2/sites-available/shop.conf"]
    # a full "create" diff, not an error about a missing /etc/apache2
    assert site.kind is ActionKind.CREATE and site.after_package == "apache2"
    assert "+  ServerName shop.example.com" in site.diff
    assert "after the install of apache2" in site.reason
    assert "validated after the install (apache2ctl -t)" in site.reason
    link = by["link /etc/apache2/sites-enabled/shop.conf"]
    assert link.kind is ActionKind.CREATE and link.after_package == "apache2"
    hello = by["file /etc/rcl-hello/hello.conf"]
    assert hello.after_package == "rcl-hello" and "rcl-hello --check" in hello.reason
    reload = by["handler apache2"]
    assert reload.kind is ActionKind.RELOAD
    assert "validated (apache2ctl -t) and reloaded after the install of apache2" in reload.reason
    start = by["service apache2"]
    assert start.kind is ActionKind.START_SERVICE and start.after_package == "apache2"
    # an independent file is planned as usual, without the annotation
    assert by["file /etc/motd"].after_package is None
    assert not plan.errors
    assert plan.as_dict()["actions"][3]["after_package"] in ("apache2", None)  # type: ignore[index]
    # every package action precedes every dependent action
    first_dependent = min(i for i, a in enumerate(plan.actions) if a.after_package)
    last_install = max(i for i, a in enumerate(plan.actions) if a.kind is ActionKind.INSTALL_PACKAGE)
    assert last_install < first_dependent


def test_installed_packages_give_plain_actions() -> None:
    plan = plan_host(web_desired(), bare(installed=("apache2", "libapache2-mod-jk", "rcl-hello")))
    assert not any(a.kind is ActionKind.INSTALL_PACKAGE for a in plan.actions)
    assert all(a.after_package is None for a in plan.actions)
    assert all("after the install" not in a.reason for a in plan.actions)


def test_purged_package_needed_by_files_is_one_clear_error_per_resource_not_a_cascade() -> None:
    plan = plan_host(web_desired(purge_apache=True), bare(installed=("apache2",)))
    assert (ActionKind.PURGE_PACKAGE, "package apache2") in [(a.kind, a.resource) for a in plan.actions]
    # nothing that needs apache2 is planned ...
    for a in plan.actions:
        assert not (a.path or "").startswith("/etc/apache2"), a
        assert a.resource not in ("service apache2", "handler apache2")
    # ... and each of them is named once, with the package and why
    assert len(plan.errors) == 3
    assert any(
        e.startswith(
            "file /etc/apache2/sites-available/shop.conf: needs package apache2, which the fleet purges"
        )
        for e in plan.errors
    )
    assert any(e.startswith("service apache2: needs package apache2") for e in plan.errors)
    # independent resources are still planned
    assert "file /etc/motd" in [a.resource for a in plan.actions]


def test_needed_package_that_nothing_installs_is_a_plan_error() -> None:
    d = Desired(
        host="h",
        files=(FileResource("/etc/foo/foo.conf", b"x\n", Domain.FILES, needs_package="foo"),),
    )
    assert needed_packages(d) == ("foo",)
    obs = Observed(host="h", packages=MappingProxyType({"foo": PackageState("foo", False)}))
    plan = plan_host(d, obs)
    assert not [a for a in plan.actions if a.path == "/etc/foo/foo.conf"]
    assert plan.errors == (
        "file /etc/foo/foo.conf: needs package foo, which is not installed and which no role or "
        "domain installs; not planned (declare the package, or stop managing what depends on it)",
    )
    # installed: planned normally
    ok = Observed(host="h", packages=MappingProxyType({"foo": PackageState("foo", True, "1")}))
    assert [a.kind for a in plan_host(d, ok).actions][0] is ActionKind.CREATE


def test_unobserved_package_state_plans_normally() -> None:
    # dpkg-query failed (an observation error is reported elsewhere): no invented plan errors
    plan = plan_host(web_desired(), bare(packages=MappingProxyType({})))
    assert not plan.errors
    assert not any(a.kind is ActionKind.INSTALL_PACKAGE for a in plan.actions)


def test_services_enabled_and_started() -> None:
    svc = Service("rcl-hello", start=("service", "rcl-hello", "start"), status=("true",))
    d = Desired(host="h", services=(svc,))

    def plan_for(state: ServiceState) -> list[tuple[ActionKind, str]]:
        obs = Observed(host="h", services=MappingProxyType({"rcl-hello": state}), init_system="sysv")
        return [(a.kind, a.reason) for a in plan_host(d, obs).actions]

    assert plan_for(ServiceState("rcl-hello", True, True)) == []
    assert plan_for(ServiceState("rcl-hello", True, None)) == []  # no init script: nothing to enable
    assert plan_for(ServiceState("rcl-hello", True, False))[0] == (
        ActionKind.ENABLE_SERVICE,
        "running, but not enabled at boot",
    )
    assert plan_for(ServiceState("rcl-hello", False, False))[0] == (
        ActionKind.START_SERVICE,
        "not running, not enabled at boot",
    )


def test_sysv_enablement_is_observed_from_runlevel_links() -> None:
    assert parse_service("a", "status 0\nrc yes\n").enabled is True
    assert parse_service("a", "status 0\nrc no\n").enabled is False
    assert parse_service("a", "status 3\nrc none\n").enabled is None
    assert parse_service("a", "status 0\n").enabled is None


# ---------------------------------------------------------------- fleet -> desired


def fleet_with_package_file(purge: tuple[str, ...] = ()) -> Fleet:
    role = Role(
        name="hello",
        packages=("curl",),
        purge_packages=purge,
        services=("rcl-hello",),
        files=("hello-conf",),
    )
    mf = ManagedFile(
        name="hello-conf",
        path="/etc/rcl-hello/hello.conf",
        content="greeting=hi\n",
        validate=("rcl-hello", "--check", "{path}"),
        package="rcl-hello",
    )
    return Fleet(
        name="t",
        mesh=Mesh(IPv4Network("10.99.0.0/24")),
        firewall=FirewallPolicy(management_sources=(IPv4Network("192.0.2.254/32"),)),
        hosts=(Host("h1", IPv4Address("192.0.2.31"), IPv4Address("10.99.0.31"), roles=("hello",)),),
        roles=MappingProxyType({"hello": role}),
        files=MappingProxyType({"hello-conf": mf}),
    )


def test_managed_file_package_is_installed_implicitly_and_the_file_planned_after_it() -> None:
    f = fleet_with_package_file()
    d = render_host(f, f.host("h1"))
    assert Package("rcl-hello") in d.packages
    conf = next(x for x in d.files if x.path == "/etc/rcl-hello/hello.conf")
    assert conf.needs_package == "rcl-hello"
    svc = next(s for s in d.services if s.name == "rcl-hello")
    assert svc.needs_package == "rcl-hello" and svc.start == ("service", "rcl-hello", "start")
    obs = Observed(
        host="h1",
        packages=MappingProxyType({n: PackageState(n, n != "rcl-hello") for n in needed_packages(d)}),
        init_system="sysv",
    )
    plan = plan_host(d, obs)
    kinds = [(a.kind, a.resource) for a in plan.actions]
    assert kinds.index((ActionKind.INSTALL_PACKAGE, "package rcl-hello")) < kinds.index(
        (ActionKind.CREATE, "file /etc/rcl-hello/hello.conf")
    )
    assert (ActionKind.START_SERVICE, "service rcl-hello") in kinds
    assert not plan.errors


def test_role_purging_a_files_package_wins_and_the_file_is_an_error() -> None:
    f = fleet_with_package_file(purge=("rcl-hello",))
    frag = packages_domain.render(f, f.host("h1"))
    assert Package("rcl-hello", state="purged") in frag.packages
    assert Package("rcl-hello") not in frag.packages
    d = render_host(f, f.host("h1"))
    obs = Observed(
        host="h1",
        packages=MappingProxyType({n: PackageState(n, True) for n in needed_packages(d)}),
    )
    plan = plan_host(d, obs)
    assert any(e.startswith("file /etc/rcl-hello/hello.conf: needs package rcl-hello") for e in plan.errors)
    assert (ActionKind.PURGE_PACKAGE, "package rcl-hello") in [(a.kind, a.resource) for a in plan.actions]


# ---------------------------------------------------------------- apt output


POSTINST_FAIL = "\n".join(
    [
        "@@APT failed 100",
        "@@PKG rcl-hello ii ",
        "@@PKG rcl-broken iF ",
        "@@LOG",
        "Setting up rcl-broken (1.0) ...",
        "rcl-broken: postinst failing on purpose",
        "dpkg: error processing package rcl-broken (--configure):",
        " installed rcl-broken package post-installation script subprocess returned error exit status 1",
        "Errors were encountered while processing:",
        " rcl-broken",
        "E: Sub-process /usr/bin/dpkg returned an error code (1)",
        "@@ENDLOG",
    ]
)


def test_postinst_failure_names_the_package_its_state_and_the_dpkg_output() -> None:
    run = parse_apt_output("install", ["rcl-hello", "rcl-broken"], sections_of(POSTINST_FAIL))
    assert not run.ok and run.lock is None and not run.transient
    assert run.done == ("rcl-hello",)
    assert run.failed == (
        (
            "rcl-broken",
            "apt-get install failed (exit 100): E: Sub-process /usr/bin/dpkg returned an error code (1); "
            "now half-configured (a maintainer script failed)",
        ),
    )
    text = run.summary()
    assert "rcl-broken: apt-get install failed" in text
    assert "post-installation script subprocess returned error exit status 1" in text


def test_lock_held_by_another_process_is_transient_with_its_pid() -> None:
    out = (
        "@@APT failed 100\n@@PKG rcl-hello missing\n@@LOG\n"
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 105 (apt-get)\n"
        "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), "
        "is another process using it?\n@@ENDLOG\n"
    )
    run = parse_apt_output("install", ["rcl-hello"], sections_of(out))
    assert run.transient and run.lock is not None
    assert run.lock.pid == 105 and run.lock.command == "apt-get"
    assert run.failed[0][1] == (
        "dpkg is locked by another process (pid 105, apt-get) [/var/lib/dpkg/lock-frontend]; "
        "nothing installed, will retry"
    )
    flocked = parse_apt_output(
        "install", ["x1"], sections_of("@@APT flocked /var/lib/dpkg/lock-frontend\n@@PKG x1 missing\n")
    )
    assert flocked.transient and flocked.lock is not None and flocked.lock.pid is None
    lists = parse_lock("E: Could not get lock /var/lib/apt/lists/lock. It is held by process 7 (apt-get)")
    assert lists is not None and lists.message().startswith("the apt package lists are locked")
    assert parse_lock("E: Unable to locate package nope") is None


def test_no_candidate_after_update_and_refused_purge() -> None:
    run = parse_apt_output(
        "install",
        ["nope"],
        sections_of("@@APT update\n@@APT no-candidate nope\n@@ERR nope E: Unable to locate package nope\n"),
    )
    assert run.updated and not run.ok
    assert run.failed[0][1].startswith("E: Unable to locate package nope (after apt-get update")
    purge = parse_apt_output(
        "purge", ["libfoo"], sections_of("@@APT would-remove apache2\n@@PKG libfoo ii \n")
    )
    assert not purge.ok
    assert "apt would also remove apache2" in purge.failed[0][1]
    done = parse_apt_output("purge", ["telnet"], sections_of("@@APT ok\n@@PKG telnet pn \n"))
    assert done.ok and done.done == ("telnet",)
    ok = parse_apt_output("install", ["a"], sections_of("@@APT update\n@@APT ok\n@@PKG a ii \n"))
    assert ok.ok and ok.updated and "after apt-get update" in ok.summary()
