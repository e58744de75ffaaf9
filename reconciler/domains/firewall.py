"""Domain `firewall`: the host's complete iptables ``filter`` table. Pure.

INPUT and FORWARD drop by default; OUTPUT accepts by default, with explicit per-peer rules
(the seed's both-direction rules, which also give per-peer counters) and two guards that keep
mesh traffic from leaving unprotected. In order:

INPUT: loopback; management SSH from ``firewall.management_sources`` (before anything that can
drop); RELATED,ESTABLISHED; INVALID dropped; per peer IKE (udp 500<->500), NAT-T (udp
4500<->4500), ESP, AH, and the mesh traffic: IP-IP only with ``-m policy --pol ipsec`` (mode
ipip) plus what comes out of that peer's tunnel interface, or the peer's internal /32 only
with ``--pol ipsec`` (mode tunnel, kernel datapath) or only on ``ipsec0`` (libipsec, which
UDP-encapsulates, so a policy match sees nothing); ICMP echo if allowed; the roles' service
ports; an optional rate-limited LOG; policy DROP.

OUTPUT: loopback; mode ipip: IP-IP to each peer only with ``--pol ipsec``, any other IP-IP
dropped; mode tunnel: the host's internal /32 never leaves in clear on the public interface;
per peer IKE, NAT-T, ESP, AH; policy ACCEPT.

Render refuses (RenderError naming the field) a ruleset that would not admit management SSH,
checked by evaluating the rendered rules (reconciler.firewall_check).
"""

from __future__ import annotations

from ipaddress import IPv4Network

from reconciler.domains.netfilter import (
    ECHO_REQUEST,
    ESTABLISHED,
    INVALID,
    IPSEC_IN,
    IPSEC_OUT,
    NO_IPSEC_OUT,
    Rule,
    Section,
    restore_text,
)
from reconciler.domains.tunnels import tunnel_name
from reconciler.errors import RenderError
from reconciler.firewall_check import ssh_admitted
from reconciler.fleet.model import Datapath, Fleet, Host, MeshMode
from reconciler.resources import Domain, FileResource, FirewallRuleset, Fragment, Validator

PERSISTENT_PATH = "/etc/iptables/rules.v4"
LIBIPSEC_IFACE = "ipsec0"
TUNNEL_IFACES = "ipip+"  # every tunnel interface (tunnels.tunnel_name starts with "ipip")
POLICIES = (("INPUT", "DROP"), ("FORWARD", "DROP"), ("OUTPUT", "ACCEPT"))


def _peer_sections(fleet: Fleet, host: Host) -> list[Section]:
    pub = host.public_interface
    mode = fleet.mesh.mode
    libipsec = fleet.mesh.datapath is Datapath.LIBIPSEC
    sections: list[Section] = []
    for peer in fleet.peers_of(host):
        p = peer.public_address
        rules = [
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="udp", sport=500, dport=500),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="udp", sport=4500, dport=4500),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="esp"),
            Rule("INPUT", "ACCEPT", src=p, in_iface=pub, proto="ah"),
        ]
        if mode is MeshMode.IPIP:
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
            rules.append(
                Rule(
                    "INPUT",
                    "ACCEPT",
                    src=peer.internal_address,
                    dst=host.internal_address,
                    in_iface=tunnel_name(peer.name),
                )
            )
        elif libipsec:
            rules.append(
                Rule(
                    "INPUT",
                    "ACCEPT",
                    src=peer.internal_address,
                    dst=host.internal_address,
                    in_iface=LIBIPSEC_IFACE,
                )
            )
        else:
            rules.append(
                Rule(
                    "INPUT", "ACCEPT", src=peer.internal_address, dst=host.internal_address, matches=IPSEC_IN
                )
            )
        sections.append(
            Section(f"peer {peer.name}: IKE, NAT-T, ESP, AH and protected mesh traffic", tuple(rules))
        )
    return sections


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


def _mesh_protection(fleet: Fleet, src: IPv4Network | None) -> tuple[str | None, tuple[str, ...]]:
    """A port opened to mesh addresses is admitted only as mesh traffic: from the tunnel
    interfaces (ipip), IPsec-protected (tunnel mode, kernel datapath) or from ``ipsec0``
    (libipsec). Otherwise a clear-text packet with a forged mesh source on the public
    interface would reach it."""
    if src is None or not src.subnet_of(fleet.mesh.internal_network):
        return None, ()
    if fleet.mesh.mode is MeshMode.IPIP:
        return TUNNEL_IFACES, ()
    if fleet.mesh.datapath is Datapath.LIBIPSEC:
        return LIBIPSEC_IFACE, ()
    return None, IPSEC_IN


def _service_ports(fleet: Fleet, host: Host) -> Section:
    seen: set[tuple[str, int, str]] = set()
    rules: list[tuple[tuple[str, int, str], Rule]] = []
    for role in fleet.roles_of(host):
        for sp in role.ports:
            sources: tuple[IPv4Network | None, ...] = sp.sources or (None,)
            for src in sources:
                key = (sp.protocol, sp.port, str(src) if src is not None else "")
                if key in seen:
                    continue
                seen.add(key)
                iface, matches = _mesh_protection(fleet, src)
                rule = Rule(
                    "INPUT",
                    "ACCEPT",
                    src=src,
                    in_iface=iface,
                    proto=sp.protocol,
                    dport=sp.port,
                    matches=matches,
                )
                rules.append((key, rule))
    rules.sort(key=lambda kr: (kr[0][1], kr[0][0], kr[0][2]))
    return Section("service ports of the roles " + ", ".join(host.roles), tuple(r for _, r in rules))


def ruleset(fleet: Fleet, host: Host) -> str:
    fw = fleet.firewall
    mgmt = tuple(
        Rule("INPUT", "ACCEPT", src=src, proto="tcp", dport=fw.management_port)
        for src in fw.management_sources
    )
    sections = [
        Section("loopback", (Rule("INPUT", "ACCEPT", in_iface="lo"),)),
        Section("management SSH, before anything that can drop", mgmt),
        Section(
            "established sessions",
            (Rule("INPUT", "ACCEPT", matches=ESTABLISHED), Rule("INPUT", "DROP", matches=INVALID)),
        ),
        *_peer_sections(fleet, host),
    ]
    if fw.allow_icmp:
        sections.append(Section("ping", (Rule("INPUT", "ACCEPT", proto="icmp", matches=ECHO_REQUEST),)))
    sections.append(_service_ports(fleet, host))
    if fw.log_drops:
        log = Rule(
            "INPUT",
            "LOG",
            matches=("-m", "limit", "--limit", "5/min"),
            target_args=("--log-prefix", '"reconciler-drop: "'),
        )
        sections.append(Section("log what the policy drops (rate-limited)", (log,)))
    sections.append(Section("outbound: loopback", (Rule("OUTPUT", "ACCEPT", out_iface="lo"),)))
    sections.append(_mesh_guard(fleet, host))
    sections += _peer_output(fleet, host)
    header = (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: iptables filter table.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
        "# Policies: INPUT DROP, FORWARD DROP, OUTPUT ACCEPT (see docs/NETWORK.md)."
    )
    return restore_text(header, POLICIES, sections)


def check_management(fleet: Fleet, host: Host, text: str) -> None:
    fw = fleet.firewall
    if not fw.management_sources:
        raise RenderError(
            f"host {host.name}: firewall.management_sources is empty: the ruleset would lock out "
            "management SSH; declare at least one source network"
        )
    problems: list[str] = []
    for net in fw.management_sources:
        for source in sorted({net.network_address, net.broadcast_address}):
            for v in ssh_admitted(
                text,
                source=source,
                address=host.public_address,
                port=fw.management_port,
                interface=host.public_interface,
            ):
                where = f"rule `{v.rule}`" if v.rule else v.reason
                problems.append(f"from {source} ({net}) to port {fw.management_port}: refused by {where}")
    if problems:
        raise RenderError(
            f"host {host.name}: the firewall would not admit management SSH "
            f"(firewall.management_sources / firewall.management_port): " + "; ".join(problems)
        )


def render(fleet: Fleet, host: Host) -> Fragment:
    text = ruleset(fleet, host)
    check_management(fleet, host, text)
    restore_check = Validator(argv=("iptables-restore", "--test", "{path}"), needs_command="iptables-restore")
    return Fragment(
        firewall=FirewallRuleset(
            rules_v4=text, persistent_path=PERSISTENT_PATH, management_port=fleet.firewall.management_port
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
        ),
    )
