"""The host's IPv6 ``filter`` table (``/etc/iptables/rules.v6``, ip6tables-restore format). Pure.

Rendered for every host, with or without a declared IPv6 address: a host may have IPv6 (a
link-local address always, SLAAC addresses from a router) and must not serve on it what its
IPv4 firewall refuses. The mesh is IPv4 (internal addresses, IPsec between public IPv4
addresses), so no mesh rule is needed here.

INPUT, in order: loopback; management SSH from the IPv6 ``firewall.management_sources``
(before anything that can drop); the ICMPv6 that IPv6 cannot work without, before conntrack
(neighbour discovery is not tracked as a connection): packet too big (path MTU discovery) and
router/neighbour solicitations and advertisements, those only with hop limit 255 (RFC 4861:
sent on the link, never routed); RELATED,ESTABLISHED; INVALID dropped; echo request if
``firewall.allow_icmp``; the roles' service ports from IPv6 sources (IPv6 networks, and source
hosts by their ``public_address_v6``; a port with no source is open to anyone); an optional
rate-limited LOG; policy DROP. FORWARD DROP; OUTPUT ACCEPT.
"""

from __future__ import annotations

from reconciler.domains.firewall_access import PortAccess, port_access
from reconciler.fleet.model import Fleet, Host
from reconciler.netfilter.rules import (
    ESTABLISHED,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOUR_ADVERTISEMENT,
    ICMP6_NEIGHBOUR_SOLICITATION,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_ROUTER_ADVERTISEMENT,
    ICMP6_ROUTER_SOLICITATION,
    INVALID,
    LOG_DROPS,
    ON_LINK_ONLY,
    Addr,
    Rule,
    Section,
    icmp6,
    restore_text,
)

PERSISTENT_PATH = "/etc/iptables/rules.v6"
POLICIES = (("INPUT", "DROP"), ("FORWARD", "DROP"), ("OUTPUT", "ACCEPT"))
ICMP6 = "ipv6-icmp"
NEIGHBOUR_DISCOVERY = (
    ICMP6_ROUTER_SOLICITATION,
    ICMP6_ROUTER_ADVERTISEMENT,
    ICMP6_NEIGHBOUR_SOLICITATION,
    ICMP6_NEIGHBOUR_ADVERTISEMENT,
)


def _port_rules(fleet: Fleet, access: PortAccess) -> list[Rule]:
    def rule(src: Addr | None = None) -> Rule:
        return Rule("INPUT", "ACCEPT", src=src, proto=access.protocol, dport=access.port)

    if access.anyone:
        return [rule()]
    rules = [rule(net) for net in access.networks_v6]
    for name in access.hosts:
        address = fleet.host(name).public_address_v6
        if address is not None:
            rules.append(rule(address))
    return rules


def ruleset(fleet: Fleet, host: Host) -> str:
    fw = fleet.firewall
    mgmt = tuple(
        Rule("INPUT", "ACCEPT", src=src, proto="tcp", dport=fw.management_port)
        for src in fw.management_sources
        if src.version == 6
    )
    essential = (Rule("INPUT", "ACCEPT", proto=ICMP6, matches=icmp6(ICMP6_PACKET_TOO_BIG)),) + tuple(
        Rule("INPUT", "ACCEPT", proto=ICMP6, matches=icmp6(kind, *ON_LINK_ONLY))
        for kind in NEIGHBOUR_DISCOVERY
    )
    sections = [
        Section("loopback", (Rule("INPUT", "ACCEPT", in_iface="lo"),)),
        Section("management SSH over IPv6, before anything that can drop", mgmt),
        Section(
            "path MTU discovery; neighbour discovery from the link only (hop limit 255)", tuple(essential)
        ),
        Section(
            "established sessions",
            (Rule("INPUT", "ACCEPT", matches=ESTABLISHED), Rule("INPUT", "DROP", matches=INVALID)),
        ),
    ]
    if fw.allow_icmp:
        ping = Rule("INPUT", "ACCEPT", proto=ICMP6, matches=icmp6(ICMP6_ECHO_REQUEST))
        sections.append(Section("ping", (ping,)))
    lines: dict[str, Rule] = {}
    for access in port_access(fleet, host):
        for r in _port_rules(fleet, access):
            lines.setdefault(r.line(), r)
    sections.append(Section("service ports of the roles " + ", ".join(host.roles), tuple(lines.values())))
    if fw.log_drops:
        sections.append(Section("log what the policy drops (rate-limited)", (LOG_DROPS,)))
    header = (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: ip6tables filter table.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
        "# Policies: INPUT DROP, FORWARD DROP, OUTPUT ACCEPT (see docs/NETWORK.md)."
    )
    return restore_text(header, POLICIES, sections)
