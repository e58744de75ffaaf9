"""Domain `firewall`: the host's complete ``filter`` tables, IPv4 (rules.v4) and IPv6
(rules.v6, ``reconciler.domains.firewall6``). Pure.

Least privilege by default: a mesh peer reaches only the ports declared for it (role ports
whose ``sources`` name it, its role, or a network holding its internal address), ping, and
what the mesh itself needs (IKE, NAT-T, ESP, AH on the public side; IP-IP only with an IPsec
policy). ``mesh.trust: all`` restores the seed's fully trusted mesh (every protected packet of a
peer accepted).

INPUT and FORWARD drop by default; OUTPUT accepts by default, with explicit per-peer rules
(the seed's both-direction rules, which also give per-peer counters) and two guards that keep
mesh traffic from leaving unprotected. rules.v4, in order:

INPUT: loopback; management SSH from ``firewall.management_sources`` (before anything that can
drop); RELATED,ESTABLISHED; INVALID dropped; mesh (internal) addresses arriving in clear on the
public interface dropped; per peer IKE (udp 500<->500), NAT-T (udp 4500<->4500), ESP, AH, IP-IP
only with ``-m policy --pol ipsec`` (mode ipip) and, only with ``mesh.trust: all``, every
protected packet of the peer; ICMP echo if allowed; the roles' service ports, by source:
networks (a mesh network only as protected mesh traffic), hosts by public address and, for mesh
peers, by internal address as protected mesh traffic only (out of ``ipip-<peer>``, on
``ipsec0`` with libipsec, or ``--pol ipsec`` on the kernel datapath); an optional rate-limited
LOG; policy DROP.

OUTPUT: loopback; mode ipip: IP-IP to each peer only with ``--pol ipsec``, any other IP-IP
dropped; mode tunnel: the host's internal /32 never leaves in clear on the public interface;
per peer IKE, NAT-T, ESP, AH; policy ACCEPT.

Render refuses (RenderError naming the field) rulesets that would not admit management SSH,
checked by evaluating the rendered rules (reconciler.netfilter.check), IPv4 and, when the host
has a public IPv6 address, IPv6.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from reconciler.domains import firewall6
from reconciler.domains.firewall_access import PortAccess, port_access
from reconciler.domains.tunnels import tunnel_name
from reconciler.errors import RenderError
from reconciler.fleet.model import Datapath, Fleet, Host, IPNetwork, MeshMode, MeshTrust
from reconciler.kinds.resources import Domain, FileResource, FirewallRuleset, Fragment, Validator
from reconciler.netfilter.check import ssh_admitted
from reconciler.netfilter.rules import (
    ECHO_REQUEST,
    ESTABLISHED,
    INVALID,
    IPSEC_IN,
    IPSEC_OUT,
    LOG_DROPS,
    NO_IPSEC_IN,
    NO_IPSEC_OUT,
    Addr,
    Rule,
    Section,
    restore_text,
)

PERSISTENT_PATH = "/etc/iptables/rules.v4"
PERSISTENT_PATH_V6 = firewall6.PERSISTENT_PATH
LIBIPSEC_IFACE = "ipsec0"
TUNNEL_IFACES = "ipip+"  # every tunnel interface (tunnels.tunnel_name starts with "ipip")
POLICIES = (("INPUT", "DROP"), ("FORWARD", "DROP"), ("OUTPUT", "ACCEPT"))


def _mesh_source(fleet: Fleet, peer: Host) -> tuple[str | None, tuple[str, ...]]:
    """How a peer's mesh traffic (from its internal address) arrives protected: out of its
    tunnel interface (ipip), on ``ipsec0`` (libipsec, which decrypts in user space) or with an
    IPsec policy (tunnel mode, kernel datapath). Returns (input interface, extra matches)."""
    if fleet.mesh.mode is MeshMode.IPIP:
        return tunnel_name(peer.name), ()
    if fleet.mesh.datapath is Datapath.LIBIPSEC:
        return LIBIPSEC_IFACE, ()
    return None, IPSEC_IN


def _peer_sections(fleet: Fleet, host: Host, peers: tuple[Host, ...]) -> list[Section]:
    pub = host.public_interface
    trusted = fleet.mesh.trust is MeshTrust.ALL
    sections: list[Section] = []
    for peer in peers:
        p = peer.public_address
        rules = [
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="udp", sport=500, dport=500),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="udp", sport=4500, dport=4500),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="esp"),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="ah"),
        ]
        if fleet.mesh.mode is MeshMode.IPIP:
            rules.append(
                Rule(
                    "INPUT",
                    "ACCEPT",
                    src=p,
                    dst=host.public_address,
                    in_iface=pub,
                    proto="ipencap",
                    matches=IPSEC_IN,
                )
            )
        if trusted:
            iface, matches = _mesh_source(fleet, peer)
            rules.append(
                Rule(
                    "INPUT",
                    "ACCEPT",
                    src=peer.internal_address,
                    dst=host.internal_address,
                    in_iface=iface,
                    matches=matches,
                )
            )
            what = "IKE, NAT-T, ESP, AH and all protected mesh traffic (mesh.trust: all)"
        elif fleet.mesh.mode is MeshMode.IPIP:
            what = "IKE, NAT-T, ESP, AH and IPsec-protected IP-IP (its traffic: declared ports only)"
        else:
            what = "IKE, NAT-T, ESP, AH (its mesh traffic: declared ports only)"
        sections.append(Section(f"peer {peer.name}: {what}", tuple(rules)))
    return sections


def _spoof_guard(fleet: Fleet, host: Host) -> Section:
    """A packet from a mesh (internal) address that arrives on the public interface without
    IPsec is forged or leaked: dropped before the ports, whatever their sources (an open port
    would otherwise admit clear text that claims to come from inside the mesh)."""
    rule = Rule(
        "INPUT",
        "DROP",
        src=fleet.mesh.internal_network,
        in_iface=host.public_interface,
        matches=NO_IPSEC_IN,
    )
    return Section("mesh addresses arrive only protected, never in clear on the public interface", (rule,))


def _clear_ipip_guard(fleet: Fleet, host: Host) -> Section:
    """An IP-IP packet that arrives on the public interface without IPsec is forged: dropped
    BEFORE the conntrack rule, else a forged packet that matches a flow the tunnel already
    carries would pass as "established" (the kernel's xfrm policy drops it later, but the
    firewall must not depend on that)."""
    if fleet.mesh.mode is not MeshMode.IPIP or not fleet.peers_of(host):
        return Section("no IP-IP mesh", ())
    rule = Rule("INPUT", "DROP", in_iface=host.public_interface, proto="ipencap", matches=NO_IPSEC_IN)
    return Section("IP-IP arrives only IPsec-protected, checked before established sessions", (rule,))


def _peer_output(fleet: Fleet, host: Host) -> list[Section]:
    pub = host.public_interface
    sections: list[Section] = []
    for peer in fleet.peers_of(host):
        p = peer.public_address
        rules = (
            Rule("OUTPUT", "ACCEPT", dst=p, out_iface=pub, proto="udp", sport=500, dport=500),
            Rule("OUTPUT", "ACCEPT", dst=p, out_iface=pub, proto="udp", sport=4500, dport=4500),
            Rule("OUTPUT", "ACCEPT", dst=p, out_iface=pub, proto="esp"),
            Rule("OUTPUT", "ACCEPT", dst=p, out_iface=pub, proto="ah"),
        )
        sections.append(Section(f"peer {peer.name}: IKE, NAT-T, ESP, AH out", rules))
    return sections


def _mesh_guard(fleet: Fleet, host: Host) -> Section:
    pub = host.public_interface
    peers = fleet.peers_of(host)
    if not peers:
        return Section("no mesh peers", ())
    if fleet.mesh.mode is MeshMode.IPIP:
        rules = [
            Rule("OUTPUT", "ACCEPT", dst=p.public_address, out_iface=pub, proto="ipencap", matches=IPSEC_OUT)
            for p in peers
        ]
        rules.append(Rule("OUTPUT", "DROP", proto="ipencap"))
        return Section("IP-IP leaves only IPsec-protected, only to peers", tuple(rules))
    rules = []
    if fleet.mesh.datapath is Datapath.LIBIPSEC:
        rules = [
            Rule(
                "OUTPUT",
                "ACCEPT",
                src=host.internal_address,
                dst=p.internal_address,
                out_iface=LIBIPSEC_IFACE,
            )
            for p in peers
        ]
    rules.append(
        Rule(
            "OUTPUT",
            "DROP",
            src=host.internal_address,
            dst=fleet.mesh.internal_network,
            out_iface=pub,
            matches=NO_IPSEC_OUT,
        )
    )
    return Section("mesh traffic never leaves in clear on the public interface", tuple(rules))


def _mesh_protection(fleet: Fleet, src: IPv4Network) -> tuple[str | None, tuple[str, ...]]:
    """A network inside the mesh is admitted only as mesh traffic: from the tunnel interfaces
    (ipip), IPsec-protected (tunnel mode, kernel datapath) or from ``ipsec0`` (libipsec)."""
    if not src.subnet_of(fleet.mesh.internal_network):
        return None, ()
    if fleet.mesh.mode is MeshMode.IPIP:
        return TUNNEL_IFACES, ()
    if fleet.mesh.datapath is Datapath.LIBIPSEC:
        return LIBIPSEC_IFACE, ()
    return None, IPSEC_IN


def _port_rules(fleet: Fleet, access: PortAccess, peers: frozenset[str]) -> list[Rule]:
    """One port's rules.v4 lines: anyone; each IPv4 network (mesh networks only as mesh
    traffic); each source host by its public address and, when it is a mesh peer, by its
    internal address as protected mesh traffic only."""

    def rule(src: Addr | None = None, iface: str | None = None, matches: tuple[str, ...] = ()) -> Rule:
        return Rule(
            "INPUT",
            "ACCEPT",
            src=src,
            in_iface=iface,
            proto=access.protocol,
            dport=access.port,
            matches=matches,
        )

    if access.anyone:
        return [rule()]
    rules = [rule(net, *_mesh_protection(fleet, net)) for net in access.networks_v4]
    for name in access.hosts:
        src = fleet.host(name)
        if name in peers:
            rules.append(rule(src.internal_address, *_mesh_source(fleet, src)))
        rules.append(rule(src.public_address))
    return rules


def _service_ports(fleet: Fleet, host: Host, peers: frozenset[str]) -> Section:
    lines: dict[str, Rule] = {}
    for access in port_access(fleet, host):
        for r in _port_rules(fleet, access, peers):
            lines.setdefault(r.line(), r)
    return Section("service ports of the roles " + ", ".join(host.roles), tuple(lines.values()))


def ruleset(fleet: Fleet, host: Host) -> str:
    """The host's rules.v4 (iptables-restore format)."""
    fw = fleet.firewall
    peers = fleet.peers_of(host)
    mgmt = tuple(
        Rule("INPUT", "ACCEPT", src=src, proto="tcp", dport=fw.management_port)
        for src in fw.management_sources
        if isinstance(src, IPv4Network)
    )
    sections = [
        Section("loopback", (Rule("INPUT", "ACCEPT", in_iface="lo"),)),
        Section("management SSH, before anything that can drop", mgmt),
        _clear_ipip_guard(fleet, host),
        Section(
            "established sessions",
            (Rule("INPUT", "ACCEPT", matches=ESTABLISHED), Rule("INPUT", "DROP", matches=INVALID)),
        ),
        _spoof_guard(fleet, host),
        *_peer_sections(fleet, host, peers),
    ]
    if fw.allow_icmp:
        sections.append(Section("ping", (Rule("INPUT", "ACCEPT", proto="icmp", matches=ECHO_REQUEST),)))
    sections.append(_service_ports(fleet, host, frozenset(p.name for p in peers)))
    if fw.log_drops:
        sections.append(Section("log what the policy drops (rate-limited)", (LOG_DROPS,)))
    sections.append(Section("outbound: loopback", (Rule("OUTPUT", "ACCEPT", out_iface="lo"),)))
    sections.append(_mesh_guard(fleet, host))
    sections += _peer_output(fleet, host)
    header = (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: iptables filter table.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
        f"# Policies: INPUT DROP, FORWARD DROP, OUTPUT ACCEPT; mesh.trust: {fleet.mesh.trust.value} "
        "(see docs/NETWORK.md)."
    )
    return restore_text(header, POLICIES, sections)


def check_management(fleet: Fleet, host: Host, text: str, text_v6: str | None = None) -> None:
    """Refuse rulesets that would not admit management SSH: from the first and last address of
    every IPv4 management source to the public address (rules.v4) and, when the host has a
    public IPv6 address, of every IPv6 management source to it (rules.v6)."""
    fw = fleet.firewall
    v4 = [n for n in fw.management_sources if isinstance(n, IPv4Network)]
    if not v4:
        raise RenderError(
            f"host {host.name}: firewall.management_sources has no IPv4 network: the ruleset would "
            "lock out management SSH (reconciler reaches hosts at their IPv4 public_address); "
            "declare at least one source network"
        )
    checks: list[tuple[IPNetwork, IPv4Address | IPv6Address, str]] = [
        (net, host.public_address, text) for net in v4
    ]
    if host.public_address_v6 is not None and text_v6 is not None:
        checks += [
            (net, host.public_address_v6, text_v6)
            for net in fw.management_sources
            if isinstance(net, IPv6Network)
        ]
    problems: list[str] = []
    for net, address, rules in checks:
        for source in sorted({net.network_address, net.broadcast_address}):
            for v in ssh_admitted(
                rules,
                source=source,
                address=address,
                port=fw.management_port,
                interface=host.public_interface,
            ):
                where = f"rule `{v.rule}`" if v.rule else v.reason
                problems.append(
                    f"from {source} ({net}) to {address} port {fw.management_port}: refused by {where}"
                )
    if problems:
        raise RenderError(
            f"host {host.name}: the firewall would not admit management SSH "
            f"(firewall.management_sources / firewall.management_port): " + "; ".join(problems)
        )


def render(fleet: Fleet, host: Host) -> Fragment:
    text = ruleset(fleet, host)
    text_v6 = firewall6.ruleset(fleet, host)
    check_management(fleet, host, text, text_v6)
    restore_check = Validator(argv=("iptables-restore", "--test", "{path}"), needs_command="iptables-restore")
    restore6_check = Validator(
        argv=("ip6tables-restore", "--test", "{path}"), needs_command="ip6tables-restore"
    )
    return Fragment(
        firewall=FirewallRuleset(
            rules_v4=text,
            persistent_path=PERSISTENT_PATH,
            management_port=fleet.firewall.management_port,
            rules_v6=text_v6,
            persistent_path_v6=PERSISTENT_PATH_V6,
        ),
        files=(
            FileResource(
                path=PERSISTENT_PATH,
                content=text.encode(),
                domain=Domain.FIREWALL,
                mode=0o640,
                validators=(restore_check,),
                needs_package="iptables-persistent",
            ),
            FileResource(
                path=PERSISTENT_PATH_V6,
                content=text_v6.encode(),
                domain=Domain.FIREWALL,
                mode=0o640,
                validators=(restore6_check,),
                needs_package="iptables-persistent",
            ),
        ),
    )
