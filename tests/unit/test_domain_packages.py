"""The packages domain: what each host must have installed and running."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

from reconciler.domains import packages
from reconciler.fleet.model import (
    Datapath,
    FirewallPolicy,
    Fleet,
    Host,
    IpsecBackend,
    Mesh,
    MeshMode,
    Role,
)


def fleet(backend: IpsecBackend = IpsecBackend.STRONGSWAN, datapath: Datapath = Datapath.KERNEL) -> Fleet:
    mode = MeshMode.TUNNEL if datapath is Datapath.LIBIPSEC else MeshMode.IPIP
    roles = {
        "web": Role(name="web", packages=("curl",), sites=("shop",), services=("cron",)),
        "db": Role(name="db", apparmor=("usr.sbin.mysqld",), purge_packages=("telnet",)),
    }
    hosts = (
        Host("db1", IPv4Address("192.0.2.21"), IPv4Address("10.99.0.21"), roles=("db",)),
        Host("web1", IPv4Address("192.0.2.11"), IPv4Address("10.99.0.11"), roles=("web",)),
    )
    return Fleet(
        name="t",
        mesh=Mesh(IPv4Network("10.99.0.0/24"), backend=backend, mode=mode, datapath=datapath),
        firewall=FirewallPolicy(management_sources=(IPv4Network("192.0.2.254/32"),)),
        hosts=hosts,
        roles=MappingProxyType(roles),
    )


def names(frag_packages: tuple[packages.Package, ...], state: str = "present") -> list[str]:
    return [p.name for p in frag_packages if p.state == state]


def test_web_host_gets_apache_mod_jk_strongswan_and_its_role_packages() -> None:
    f = fleet()
    frag = packages.render(f, f.host("web1"))
    got = names(frag.packages)
    for want in (
        "apache2",
        "libapache2-mod-jk",
        "strongswan-charon",
        "strongswan-swanctl",
        "iptables",
        "curl",
    ):
        assert want in got
    assert "apparmor" not in got
    assert got == sorted(got)
    assert [s.name for s in frag.services] == ["apache2", "cron"]
    apache = frag.services[0]
    assert apache.start == ("apache2ctl", "start") and apache.needs_package == "apache2"


def test_db_host_gets_apparmor_and_purges_only_what_the_fleet_says() -> None:
    f = fleet()
    frag = packages.render(f, f.host("db1"))
    assert "apparmor" in names(frag.packages)
    assert "apache2" not in names(frag.packages)
    assert names(frag.packages, "purged") == ["telnet"]
    assert frag.services == ()


def test_libipsec_datapath_adds_the_extra_plugins_and_racoon_its_own_stack() -> None:
    f = fleet(datapath=Datapath.LIBIPSEC)
    assert "libcharon-extra-plugins" in names(packages.render(f, f.host("db1")).packages)
    r = fleet(backend=IpsecBackend.RACOON)
    got = names(packages.render(r, r.host("db1")).packages)
    assert "racoon" in got and "ipsec-tools" in got and "strongswan-charon" not in got
