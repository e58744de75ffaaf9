"""The least-privilege mesh firewall and rules.v6, as rendered and judged packet by packet.

The attacker here is a linked mesh peer (its traffic arrives protected, so the old ruleset
trusted it) or someone forging a mesh source in clear on the public interface; the fleet
declares who may reach what (role ports' sources by host, role or network)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

import pytest
from network_fleets import example_fleet, with_hosts

from reconciler.domains import firewall, firewall6
from reconciler.domains.firewall_access import management_admits, mesh_admits, port_access
from reconciler.errors import RenderError
from reconciler.fleet.model import Datapath, Fleet, MeshMode, MeshTrust, Role, ServicePort, Topology
from reconciler.netfilter.check import Packet, ssh_admitted, verdict

WEB1, WEB2, DB1, DB2 = (IPv4Address(f"10.99.0.{n}") for n in (11, 12, 21, 22))


def fleet_with(
    *,
    mode: MeshMode = MeshMode.TUNNEL,
    datapath: Datapath = Datapath.LIBIPSEC,
    trust: MeshTrust = MeshTrust.LEAST,
    web_ports: tuple[ServicePort, ...] | None = None,
) -> Fleet:
    f = example_fleet(mode=mode, datapath=datapath)
    roles = dict(f.roles)
    if web_ports is not None:
        roles["web"] = replace(roles["web"], ports=web_ports)
    return replace(f, mesh=replace(f.mesh, trust=trust), roles=MappingProxyType(roles))


def v4(fleet: Fleet, host: str) -> str:
    return firewall.ruleset(fleet, fleet.host(host))


def v6(fleet: Fleet, host: str) -> str:
    return firewall6.ruleset(fleet, fleet.host(host))


def mesh_syn(src: IPv4Address, dst: IPv4Address, port: int, **kw: object) -> Packet:
    return Packet(src, dst, "tcp", 40000, port, syn=True, **kw)  # type: ignore[arg-type]


HTTP_FROM_DB1 = (
    ServicePort(port=80, name="http", source_hosts=("db1",)),
    ServicePort(port=443, name="https"),
)


@pytest.mark.parametrize(
    ("mode", "datapath", "how"),
    [
        (MeshMode.TUNNEL, Datapath.LIBIPSEC, {"in_iface": "ipsec0"}),
        (MeshMode.TUNNEL, Datapath.KERNEL, {"in_iface": "eth0", "ipsec": True}),
        (MeshMode.IPIP, Datapath.KERNEL, {"in_iface": "ipip-PEER"}),
    ],
)
def test_a_linked_peer_reaches_only_the_ports_declared_for_it(
    mode: MeshMode, datapath: Datapath, how: dict[str, object]
) -> None:
    fleet = fleet_with(mode=mode, datapath=datapath, web_ports=HTTP_FROM_DB1)
    text = v4(fleet, "web1")

    def protected(peer: str, src: IPv4Address, port: int) -> bool:
        kw = {k: (v.replace("PEER", peer) if isinstance(v, str) else v) for k, v in how.items()}
        return verdict(text, "INPUT", mesh_syn(src, WEB1, port, **kw)).accepted

    assert protected("db1", DB1, 80)  # declared: sources [db1]
    assert not protected("db2", DB2, 80)  # linked, protected, but not declared
    assert not protected("web2", WEB2, 80)
    assert protected("db2", DB2, 443)  # 443 is open to anyone
    for peer, src in (("db1", DB1), ("db2", DB2), ("web2", WEB2)):
        assert not protected(peer, src, 8009)  # AJP: declared for nobody
        assert not protected(peer, src, 22)  # management SSH: only the management sources
    # a forged mesh source in clear on the public interface never gets in, even to an open port
    clear = mesh_syn(DB1, WEB1, 443, in_iface="eth0", ipsec=False)
    assert not verdict(text, "INPUT", clear).accepted
    assert not any("-d 10.99.0.11/32 -i ipsec0 -j ACCEPT" in ln for ln in text.splitlines())


def test_a_source_host_is_its_public_address_and_over_the_mesh_its_internal_one() -> None:
    fleet = fleet_with(web_ports=HTTP_FROM_DB1)
    text = v4(fleet, "web1")
    assert "-A INPUT -s 10.99.0.21/32 -i ipsec0 -p tcp -m tcp --dport 80 -j ACCEPT" in text
    assert "-A INPUT -s 192.0.2.21/32 -p tcp -m tcp --dport 80 -j ACCEPT" in text
    pub = Packet(IPv4Address("192.0.2.21"), IPv4Address("192.0.2.11"), "tcp", 40000, 80, in_iface="eth0")
    assert verdict(text, "INPUT", pub).accepted
    assert not verdict(text, "INPUT", replace(pub, src=IPv4Address("192.0.2.22"))).accepted


def test_a_source_host_that_is_not_a_mesh_peer_is_admitted_by_its_public_address_only() -> None:
    base = fleet_with(web_ports=HTTP_FROM_DB1)
    fleet = replace(base, mesh=replace(base.mesh, topology=Topology.LINKS, links=(("db2", "web1"),)))
    text = v4(fleet, "web1")
    assert "-A INPUT -s 192.0.2.21/32 -p tcp -m tcp --dport 80 -j ACCEPT" in text
    assert "10.99.0.21" not in text  # no protected path between web1 and db1: no internal rule


def test_a_role_source_means_every_host_with_that_role() -> None:
    fleet = fleet_with()
    (mysql,) = port_access(fleet, fleet.host("db1"))
    assert mysql.hosts == ("web1", "web2") and not mysql.anyone
    text = v4(fleet, "db1")
    for src in (WEB1, WEB2):
        assert verdict(text, "INPUT", mesh_syn(src, DB1, 3306, in_iface="ipsec0")).accepted
    assert not verdict(text, "INPUT", mesh_syn(DB2, DB1, 3306, in_iface="ipsec0")).accepted
    assert mesh_admits(fleet, fleet.host("web1"), mysql) and not mesh_admits(fleet, fleet.host("db2"), mysql)


def test_a_network_source_inside_the_mesh_is_admitted_only_as_mesh_traffic() -> None:
    ports = (ServicePort(port=8080, sources=(IPv4Network("10.99.0.16/28"), IPv4Network("203.0.113.0/24"))),)
    fleet = fleet_with(web_ports=ports)
    text = v4(fleet, "web1")
    assert "-A INPUT -s 10.99.0.16/28 -i ipsec0 -p tcp -m tcp --dport 8080 -j ACCEPT" in text
    assert "-A INPUT -s 203.0.113.0/24 -p tcp -m tcp --dport 8080 -j ACCEPT" in text
    (access,) = port_access(fleet, fleet.host("web1"))
    # db1 and db2 (10.99.0.21/22) are inside 10.99.0.16/28, web2 (10.99.0.12) is not
    assert mesh_admits(fleet, fleet.host("db1"), access) and mesh_admits(fleet, fleet.host("db2"), access)
    assert not mesh_admits(fleet, fleet.host("web2"), access)
    assert verdict(text, "INPUT", mesh_syn(DB2, WEB1, 8080, in_iface="ipsec0")).accepted
    assert not verdict(text, "INPUT", mesh_syn(WEB2, WEB1, 8080, in_iface="ipsec0")).accepted
    assert not verdict(text, "INPUT", mesh_syn(DB2, WEB1, 8080, in_iface="eth0")).accepted


def test_trust_all_is_the_explicit_opt_in_to_the_fully_trusted_mesh() -> None:
    fleet = fleet_with(trust=MeshTrust.ALL, web_ports=HTTP_FROM_DB1)
    text = v4(fleet, "web1")
    assert "-A INPUT -s 10.99.0.22/32 -d 10.99.0.11/32 -i ipsec0 -j ACCEPT" in text
    assert "mesh.trust: all" in text
    for port in (80, 8009, 22):
        assert verdict(text, "INPUT", mesh_syn(DB2, WEB1, port, in_iface="ipsec0")).accepted
    assert management_admits(fleet, fleet.host("db2"))
    # still never in clear
    assert not verdict(text, "INPUT", mesh_syn(DB2, WEB1, 80, in_iface="eth0")).accepted


def test_the_mesh_itself_still_works_under_least_privilege() -> None:
    fleet = fleet_with(mode=MeshMode.IPIP, datapath=Datapath.KERNEL)
    text = v4(fleet, "web1")
    peer, me = IPv4Address("192.0.2.21"), IPv4Address("192.0.2.11")
    for proto, port in (("udp", 500), ("udp", 4500), ("esp", None), ("ah", None)):
        assert verdict(text, "INPUT", Packet(peer, me, proto, port, port, in_iface="eth0")).accepted
    assert verdict(text, "INPUT", Packet(peer, me, "ipencap", in_iface="eth0", ipsec=True)).accepted
    assert not verdict(text, "INPUT", Packet(peer, me, "ipencap", in_iface="eth0")).accepted
    ping = Packet(DB1, WEB1, "icmp", in_iface="ipip-db1", icmp_type=8)
    assert verdict(text, "INPUT", ping).accepted  # ping: firewall.allow_icmp


def test_rules_v6_default_drop_neighbour_discovery_and_declared_v6_sources() -> None:
    ports = (
        ServicePort(port=80, name="http", source_hosts=("db1",)),
        ServicePort(port=443, name="https"),
        ServicePort(port=8080, sources=(IPv6Network("2001:db8:aa::/48"), IPv4Network("203.0.113.0/24"))),
    )
    fleet = fleet_with(web_ports=ports)
    text = v6(fleet, "web1")
    lines = [ln for ln in text.splitlines() if ln.startswith("-A")]
    nd = [i for i, ln in enumerate(lines) if "--icmpv6-type 13" in ln]
    ct = next(i for i, ln in enumerate(lines) if "INVALID" in ln)
    assert len(nd) == 4 and max(nd) < ct  # ND before conntrack (it is not tracked)
    assert all("-m hl --hl-eq 255" in lines[i] for i in nd)
    assert "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 2 -j ACCEPT" in lines
    assert "-A INPUT -s 2001:db8::21/128 -p tcp -m tcp --dport 80 -j ACCEPT" in lines
    assert "-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT" in lines
    assert "-A INPUT -s 2001:db8:aa::/48 -p tcp -m tcp --dport 8080 -j ACCEPT" in lines
    assert "203.0.113" not in text  # IPv4 sources stay in rules.v4
    me = IPv6Address("2001:db8::11")

    def syn(src: str, port: int) -> bool:
        return verdict(
            text, "INPUT", Packet(IPv6Address(src), me, "tcp", 40000, port, in_iface="eth0")
        ).accepted

    assert syn("2001:db8::21", 80) and not syn("2001:db8::22", 80) and syn("2001:db8::22", 443)
    assert syn("2001:db8:aa::5", 8080) and not syn("2001:db8:bb::5", 8080)
    assert not syn("2001:db8::21", 22) and not syn("2001:db8::21", 8009)
    ns = Packet(IPv6Address("fe80::1"), me, "ipv6-icmp", in_iface="eth0", icmp_type=135, hop_limit=255)
    assert verdict(text, "INPUT", ns).accepted
    assert not verdict(text, "INPUT", replace(ns, hop_limit=64)).accepted  # routed: not ND
    echo = replace(ns, icmp_type=128, hop_limit=64)
    assert verdict(text, "INPUT", echo).accepted
    quiet = replace(fleet, firewall=replace(fleet.firewall, allow_icmp=False))
    assert not verdict(v6(quiet, "web1"), "INPUT", echo).accepted


def test_rules_v6_for_a_host_without_ipv6_is_still_default_drop() -> None:
    base = fleet_with()
    hosts = tuple(replace(h, public_address_v6=None) for h in base.hosts)
    fleet = with_hosts(base, hosts)
    text = v6(fleet, "db1")
    assert ":INPUT DROP [0:0]" in text and "--dport 3306" not in text  # web hosts have no v6
    d = firewall.render(fleet, fleet.host("db1"))
    assert d.firewall is not None and d.firewall.rules_v6 == text
    assert {f.path for f in d.files} == {"/etc/iptables/rules.v4", "/etc/iptables/rules.v6"}
    v6_file = next(f for f in d.files if f.path.endswith("v6"))
    assert v6_file.validators[0].argv == ("ip6tables-restore", "--test", "{path}") and v6_file.mode == 0o640


def test_management_ssh_over_ipv6_is_admitted_and_checked_for_lockout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = fleet_with()
    mgmt = (*base.firewall.management_sources, IPv6Network("2001:db8:ff::/48"))
    fleet = replace(base, firewall=replace(base.firewall, management_sources=mgmt))
    text = v6(fleet, "web1")
    assert "-A INPUT -s 2001:db8:ff::/48 -p tcp -m tcp --dport 22 -j ACCEPT" in text
    assert "2001:db8:ff::" not in v4(fleet, "web1")
    assert not ssh_admitted(
        text,
        source=IPv6Address("2001:db8:ff::1"),
        address=IPv6Address("2001:db8::11"),
        port=22,
        interface="eth0",
    )
    firewall.render(fleet, fleet.host("web1"))  # admitted: no error

    original = firewall6.ruleset

    def broken(f: Fleet, h: object) -> str:  # a rule that drops part of the v6 management network
        return original(f, h).replace(
            "# loopback\n", "# loopback\n-A INPUT -s 2001:db8:ff:8000::/49 -j DROP\n", 1
        )  # type: ignore[arg-type]

    monkeypatch.setattr(firewall6, "ruleset", broken)
    with pytest.raises(RenderError) as err:
        firewall.render(fleet, fleet.host("web1"))
    msg = str(err.value)
    assert "firewall.management_sources" in msg and "2001:db8:ff:ffff:ffff:ffff:ffff:ffff" in msg
    assert "-A INPUT -s 2001:db8:ff:8000::/49 -j DROP" in msg
    # a host without an IPv6 address has no IPv6 management address to lock out
    hosts = tuple(replace(h, public_address_v6=None) if h.name == "web1" else h for h in fleet.hosts)
    no_v6 = with_hosts(fleet, hosts)
    firewall.render(no_v6, no_v6.host("web1"))


def test_render_refuses_management_sources_without_ipv4() -> None:
    base = fleet_with()
    fleet = replace(
        base, firewall=replace(base.firewall, management_sources=(IPv6Network("2001:db8:ff::/48"),))
    )
    with pytest.raises(RenderError, match=r"management_sources has no IPv4 network"):
        firewall.render(fleet, fleet.host("web1"))


def test_ports_are_merged_over_roles_and_anyone_wins() -> None:
    base = fleet_with(web_ports=HTTP_FROM_DB1)
    extra = Role(
        name="extra", ports=(ServicePort(port=80, name="http2"), ServicePort(port=9000, source_roles=("db",)))
    )
    roles = MappingProxyType({**base.roles, "extra": extra})
    hosts = tuple(replace(h, roles=(*h.roles, "extra")) if h.name == "web1" else h for h in base.hosts)
    fleet = with_hosts(replace(base, roles=roles), hosts)
    by_port = {a.port: a for a in port_access(fleet, fleet.host("web1"))}
    assert by_port[80].anyone and by_port[80].names == ("http", "http2")
    assert by_port[9000].hosts == ("db1", "db2")
    assert "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT" in v4(fleet, "web1")


@pytest.mark.parametrize("ctstate", ["NEW", "ESTABLISHED"])
def test_clear_ipip_from_a_peer_is_dropped_even_inside_a_tracked_flow(ctstate: str) -> None:
    """A forged IP-IP packet in clear with a peer's public address: dropped by the guard that
    comes before the conntrack rule (a forged packet of a flow the tunnel carries is
    ESTABLISHED to conntrack); the same packet inside IPsec is the peer's tunnel, admitted."""
    fleet = fleet_with(mode=MeshMode.IPIP, datapath=Datapath.KERNEL)
    text = v4(fleet, "web1")
    web1, web2 = fleet.host("web1"), fleet.host("web2")
    clear = Packet(web2.public_address, web1.public_address, "ipencap", in_iface="eth0", ctstate=ctstate)
    got = verdict(text, "INPUT", clear)
    assert not got.accepted and got.rule is not None and "--pol none" in got.rule, got
    lines = text.splitlines()
    guard = next(i for i, line in enumerate(lines) if "-p ipencap" in line and "--pol none -j DROP" in line)
    established = next(i for i, line in enumerate(lines) if "RELATED,ESTABLISHED" in line)
    assert guard < established
    protected = replace(clear, ipsec=True)
    assert verdict(text, "INPUT", protected).accepted


def test_no_clear_ipip_guard_without_ipip() -> None:
    text = v4(fleet_with(mode=MeshMode.TUNNEL, datapath=Datapath.KERNEL), "web1")
    assert "-p ipencap -m policy --dir in --pol none" not in text
