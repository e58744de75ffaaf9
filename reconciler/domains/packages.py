"""Domain `packages`: the software each host needs, and the services that must run.

A role declares packages, packages to purge and services; every other domain adds what it
needs implicitly (strongSwan and its plugins for the mesh, Apache and mod_jk for sites, the
AppArmor parser for profiles, iptables and its persistence for the firewall), and a managed file
adds its own ``package``. A package a role purges is never installed, even when a domain needs
it: the resources that need it are then plan errors (docs/PACKAGES.md). Pure.
"""

from __future__ import annotations

from reconciler.fleet.model import Datapath, Fleet, Host, IpsecBackend, MeshMode
from reconciler.kinds.resources import Fragment, Package, Service

# What each concern needs installed, on Debian 12.
FIREWALL_PACKAGES = ("iptables", "iptables-persistent")
# strongswan-starter: the systemd unit that runs charon (domains/strongswan.SYSTEMD_UNIT)
STRONGSWAN_PACKAGES = ("strongswan-charon", "strongswan-swanctl", "strongswan-starter", "openssl", "tcpdump")
IPIP_PACKAGES = ("ifupdown",)  # the tunnels' persistent config is ifupdown stanzas
LIBIPSEC_PACKAGES = ("libcharon-extra-plugins",)
# racoon and ipsec-tools left Debian after 11: installing them fails on Debian 12, and the
# plan says so (the legacy backend is for hosts that still have them).
RACOON_PACKAGES = ("ipsec-tools", "racoon", "tcpdump")
APACHE_PACKAGES = ("apache2", "libapache2-mod-jk")
APPARMOR_PACKAGES = ("apparmor",)

APACHE_PID = "/var/run/apache2/apache2.pid"
# A fixed probe (no user data in it): the apache2 master from its pid file is alive.
APACHE_STATUS = ("sh", "-c", f'test -s {APACHE_PID} && kill -0 "$(cat {APACHE_PID})"')


def implicit_packages(fleet: Fleet, host: Host) -> tuple[str, ...]:
    """Packages the host's declared concerns need, whether or not a role lists them."""
    names: list[str] = list(FIREWALL_PACKAGES)
    if fleet.peers_of(host):
        if fleet.mesh.backend is IpsecBackend.STRONGSWAN:
            names += STRONGSWAN_PACKAGES
            if fleet.mesh.datapath is Datapath.LIBIPSEC:
                names += LIBIPSEC_PACKAGES
        else:
            names += RACOON_PACKAGES
        if fleet.mesh.mode is MeshMode.IPIP:
            names += IPIP_PACKAGES
    roles = fleet.roles_of(host)
    if any(r.sites for r in roles):
        names += APACHE_PACKAGES
    if any(r.apparmor for r in roles):
        names += APPARMOR_PACKAGES
    # a managed file's own package (ManagedFile.package)
    for r in roles:
        for f in r.files:
            mf = fleet.files.get(f)
            if mf is not None and mf.package:
                names.append(mf.package)
    return tuple(dict.fromkeys(names))


def generic_service(name: str, package: str | None = None) -> Service:
    """A role-declared service, driven through its init script when PID 1 is not systemd
    (``update-rc.d NAME defaults`` enables it); through systemctl where PID 1 is systemd.
    ``package``: the package that brings it (a service named like a package the host installs),
    so it is started after that install and held back when the install fails."""
    return Service(
        name=name,
        start=("service", name, "start"),
        stop=("service", name, "stop"),
        status=("service", name, "status"),
        log_path=None,
        needs_package=package,
    )


def apache_service() -> Service:
    return Service(
        name="apache2",
        start=("apache2ctl", "start"),
        stop=("apache2ctl", "stop"),
        status=APACHE_STATUS,
        pid_file=APACHE_PID,
        log_path="/var/log/apache2/error.log",
        needs_package="apache2",
    )


def render(fleet: Fleet, host: Host) -> Fragment:
    roles = fleet.roles_of(host)
    purged = {p for r in roles for p in r.purge_packages}
    wanted = list(implicit_packages(fleet, host)) + [p for r in roles for p in r.packages]
    # a role's ``replaces`` lets apt remove those packages to install that role's packages
    replaces: dict[str, set[str]] = {}
    for r in roles:
        for p in r.packages:
            replaces.setdefault(p, set()).update(r.replaces)
    packages = [
        Package(name=p, replaces=tuple(sorted(replaces.get(p, ()))))
        for p in dict.fromkeys(wanted)
        if p not in purged
    ]
    packages += [Package(name=p, state="purged") for p in sorted(purged)]

    services: list[Service] = []
    if any(r.sites for r in roles):
        services.append(apache_service())
    declared = [s for r in roles for s in r.services]
    tied = {name: pkg for r in roles for name, pkg in r.service_packages}
    installed = {p.name for p in packages if p.state == "present"}
    for name in dict.fromkeys(declared):
        if name == "apache2" and any(s.name == "apache2" for s in services):
            continue
        # the package that brings it: declared ({name, package}), else a package of the same name
        package = tied.get(name) or (name if name in installed else None)
        services.append(generic_service(name, package=package))
    return Fragment(
        packages=tuple(sorted(packages, key=lambda p: p.name)),
        services=tuple(sorted(services, key=lambda s: s.name)),
    )
