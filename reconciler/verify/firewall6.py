"""The IPv6 firewall check (host level): does the host's LIVE ip6tables ruleset
(``ip6tables-save -t filter``) drop what nobody declared and admit what IPv6 and the fleet need?

Probes, each a synthetic packet through the conservative evaluator of
``reconciler.netfilter.check`` (the same as for IPv4): neighbour and router solicitations and
advertisements from the link (hop limit 255) and packet-too-big admitted; echo request admitted
only if ``firewall.allow_icmp``; a SYN from an outside address to a port nobody declared
refused; management SSH from every IPv6 management source admitted; every role port admitted
from its IPv6 sources (networks, source hosts' ``public_address_v6``) and refused from an
address outside them (unless open to anyone). Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from reconciler.domains.firewall_access import PortAccess
from reconciler.netfilter.check import Packet, evaluate
from reconciler.netfilter.iptables import ParseError, parse_filter
from reconciler.verify.checks import Check, failed, passed, skipped
from reconciler.verify.facts import HostFacts
from reconciler.verify.firewall import undeclared_port

NAME = "firewall.v6"
LINK_LOCAL = IPv6Address("fe80::1")
# outside addresses for "refused from anyone else" (the first not covered by a source is used)
OUTSIDERS = tuple(
    IPv6Address(a) for a in ("2001:db8:ffff:ffff::1", "fd00:ffff::1", "2001:db8::dead:beef", "2002::1")
)


@dataclass(frozen=True)
class Probe6:
    what: str
    packet: Packet
    admit: bool


def _outsider(networks: Sequence[IPv6Network], addresses: Sequence[IPv6Address]) -> IPv6Address | None:
    return next((a for a in OUTSIDERS if a not in addresses and not any(a in n for n in networks)), None)


def probes(
    *,
    own: IPv6Address,
    interface: str,
    allow_icmp: bool,
    management_port: int,
    management_sources: Sequence[IPv6Network],
    ports: Sequence[tuple[PortAccess, Sequence[IPv6Address]]],
) -> list[Probe6]:
    """``ports``: each role port and the IPv6 addresses of its source hosts."""

    def pkt(src: IPv6Address, proto: str, **kw: object) -> Packet:
        return Packet(src, own, proto, in_iface=interface, **kw)  # type: ignore[arg-type]

    def icmp(kind: int, hl: int = 255, src: IPv6Address = LINK_LOCAL) -> Packet:
        return pkt(src, "ipv6-icmp", icmp_type=kind, hop_limit=hl)

    outside = OUTSIDERS[0]
    out = [
        Probe6("neighbour solicitation from the link", icmp(135), True),
        Probe6("neighbour advertisement from the link", icmp(136), True),
        Probe6("router solicitation from the link", icmp(133), True),
        Probe6("router advertisement from the link", icmp(134), True),
        Probe6("neighbour solicitation from off the link (hop limit 64)", icmp(135, 64, outside), False),
        Probe6("packet too big (path MTU)", icmp(2, 64, outside), True),
        Probe6("echo request", icmp(128, 64, outside), allow_icmp),
    ]
    declared = {a.port for a, _ in ports}
    spare = undeclared_port(declared | {management_port})
    out.append(
        Probe6(
            f"tcp {spare} (declared for nobody)",
            pkt(outside, "tcp", sport=40000, dport=spare, syn=True),
            False,
        )
    )
    for net in management_sources:
        out.append(
            Probe6(
                f"management SSH from {net}",
                pkt(net.network_address, "tcp", sport=40000, dport=management_port, syn=True),
                True,
            )
        )
    for access, hosts in ports:

        def port_pkt(src: IPv6Address, a: PortAccess = access) -> Packet:
            return pkt(src, a.protocol, sport=40000, dport=a.port, syn=a.protocol == "tcp")

        sources = [*(n.network_address for n in access.networks_v6), *hosts]
        for src in sources:
            out.append(Probe6(f"{access.label} from {src}", port_pkt(src), True))
        if access.anyone:
            out.append(Probe6(f"{access.label} from anyone", port_pkt(outside), True))
            continue
        other = _outsider(access.networks_v6, hosts)
        if other is not None:
            out.append(Probe6(f"{access.label} from {other} (not a source)", port_pkt(other), False))
    return out


def check(
    host: str, facts: HostFacts, probe_list: Sequence[Probe6], *, skip_reason: str | None = None
) -> Check:
    if skip_reason:
        return skipped(host, "", NAME, skip_reason)
    if facts.error is not None:
        return failed(host, "", NAME, f"cannot read {host}: {facts.error}")
    sec = facts.get("ip6tables")
    if sec is None:
        return skipped(host, "", NAME, "ip6tables-save was not read")
    if sec.out.strip() == "NO-IPV6":
        return skipped(host, "", NAME, f"{host}'s kernel has no IPv6 (no /proc/net/if_inet6)")
    if not sec.ok:
        why = (sec.err or sec.out).strip().splitlines()[-1:]
        return failed(host, "", NAME, f"ip6tables-save failed on {host}: {why[0] if why else '?'}")
    if "*filter" not in sec.out:
        return failed(host, "", NAME, f"{host} has no IPv6 filter table loaded (ip6tables-save printed none)")
    try:
        table = parse_filter(sec.out)
    except ParseError as err:
        return failed(host, "", NAME, f"cannot evaluate the live IPv6 ruleset of {host}: {err}")
    good: list[str] = []
    bad: list[str] = []
    for p in probe_list:
        v = evaluate(table, "INPUT", p.packet)
        assert v is not None
        if v.accepted == p.admit:
            good.append(p.what)
            continue
        by = f"`{v.rule}`" if v.rule else v.reason
        bad.append(f"{p.what} is {'refused' if p.admit else 'admitted'} by {by}")
    evidence = f"{len(good)} of {len(good) + len(bad)} IPv6 probes as required: " + ", ".join(good)
    if bad:
        return failed(host, "", NAME, "; ".join(bad), evidence)
    return passed(host, "", NAME, evidence)
