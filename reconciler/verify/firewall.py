"""The firewall check: does the host's LIVE ruleset (``iptables-save -t filter``) admit IKE
(udp 500), NAT-T / ESP-in-UDP (udp 4500), ESP and AH from and to the peer, admit the peer's
mesh traffic only when IPsec-protected and only to the ports declared for it (least
privilege: a declared port admitted, the management port and an undeclared one refused unless
declared; ``mesh.trust: all``: any port), and keep clear-text mesh traffic off the public
interface in both directions?

Each question is a synthetic packet run through the conservative evaluator of
``reconciler.netfilter.check`` (the one render uses for the SSH lock-out check): "admitted"
is only answered when certain. Pure.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Required, TypedDict, Unpack

from reconciler.domains.firewall_access import management_admits, mesh_admits, port_access
from reconciler.fleet.model import Datapath, Fleet, Host, MeshMode
from reconciler.netfilter.check import Packet, evaluate
from reconciler.netfilter.iptables import ParseError, Table, parse_filter
from reconciler.verify.checks import Check, failed, passed
from reconciler.verify.facts import HostFacts

NAME = "firewall"


# a rule's -s or -d as (network int, mask int, negated); None when the rule has none
_Net = tuple[int, int, bool] | None


@dataclass(frozen=True)
class _Chain:
    """One chain's rules with their -s/-d pre-parsed, indexed by exact (/32, not negated)
    source address: a packet only needs the rules indexed under its source plus the others."""

    rules: list[tuple[int, list[str]]]
    dst: list[_Net]  # per rule
    by_src: dict[int, list[int]]  # exact source address -> rule indices
    other: list[tuple[int, _Net]]  # rule index, its -s (None, wider or negated)


@dataclass(frozen=True)
class _Prepared:
    table: Table
    chains: dict[str, _Chain]


def _net(word: str, negated: bool) -> _Net:
    try:
        net = IPv4Network(word, strict=False)
    except ValueError:
        return None  # leave it to the evaluator
    return int(net.network_address), int(net.netmask), negated


def _matches(net: _Net, addr: int) -> bool:
    if net is None:
        return True
    base, mask, negated = net
    return ((addr & mask) == base) != negated


@functools.lru_cache(maxsize=512)
def _prepare(text: str) -> _Prepared:
    """One parse per live ruleset, however many peers and probes are checked against it."""
    table = parse_filter(text)
    chains: dict[str, _Chain] = {}
    for chain, rules in table.rules.items():
        dsts: list[_Net] = []
        by_src: dict[int, list[int]] = {}
        other: list[tuple[int, _Net]] = []
        for idx, (_, words) in enumerate(rules):
            src: _Net = None
            dst: _Net = None
            for i, w in enumerate(words[:-1]):
                if w in ("-s", "--source", "-d", "--destination"):
                    net = _net(words[i + 1], i > 0 and words[i - 1] == "!")
                    if w.startswith(("-s", "--s")):
                        src = net
                    else:
                        dst = net
            dsts.append(dst)
            if src is not None and src[1] == 0xFFFFFFFF and not src[2]:
                by_src.setdefault(src[0], []).append(idx)
            else:
                other.append((idx, src))
        chains[chain] = _Chain(rules, dsts, by_src, other)
    return _Prepared(table, chains)


def _for_packet(prep: _Prepared, pkt: Packet) -> Table:
    """The table without the rules whose -s/-d cannot match ``pkt`` (the evaluator would
    skip them too): the same verdict, a fraction of the work on a large mesh ruleset."""
    src, dst = int(pkt.src), int(pkt.dst)
    rules: dict[str, list[tuple[int, list[str]]]] = {}
    for name, chain in prep.chains.items():
        picked = list(chain.by_src.get(src, ()))
        picked += [idx for idx, net in chain.other if _matches(net, src)]
        picked.sort()
        rules[name] = [chain.rules[i] for i in picked if _matches(chain.dst[i], dst)]
    return Table(policies=prep.table.policies, rules=rules)


LIBIPSEC_IFACE = "ipsec0"
PROBE_PORT = 9  # "discard": a port no role opens; stands for any unprotected mesh traffic
SPARE_PORTS = (9, 7, 13, 19, 37, 79, 113, 119)  # candidates for "a port nobody declared"


@dataclass(frozen=True)
class PortProbe:
    """A port of the host and whether the peer's protected mesh traffic must reach it."""

    protocol: str  # tcp | udp
    port: int
    admit: bool
    label: str


def undeclared_port(declared: set[int]) -> int:
    return next((p for p in SPARE_PORTS if p not in declared), 65000)


def port_probes(fleet: Fleet, host: Host, peer: Host) -> list[PortProbe]:
    """The host's declared ports and its management SSH port, each with whether ``peer``'s
    protected mesh traffic must reach it (the fleet's answer: ``domains.firewall_access``)."""
    merged: dict[tuple[str, int], tuple[bool, list[str]]] = {}
    for access in port_access(fleet, host):
        merged[(access.protocol, access.port)] = (mesh_admits(fleet, peer, access), [access.label])
    mgmt = ("tcp", fleet.firewall.management_port)
    admit, labels = merged.get(mgmt, (False, []))
    merged[mgmt] = (
        admit or management_admits(fleet, peer),
        [*labels, "management SSH"] if labels else [f"{mgmt[1]}/tcp (management SSH)"],
    )
    return [
        PortProbe(proto, port, admit, " / ".join(labels))
        for (proto, port), (admit, labels) in sorted(merged.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]


@dataclass(frozen=True)
class Probe:
    what: str
    chain: str
    packet: Packet
    admit: bool  # the ruleset must admit (True) or refuse (False) it


def probes(
    *,
    own_public: IPv4Address,
    peer_public: IPv4Address,
    own_internal: IPv4Address,
    peer_internal: IPv4Address,
    interface: str,
    mode: MeshMode,
    datapath: Datapath,
    ports: Sequence[PortProbe] = (),
    trust_all: bool = True,
    peer_tunnel: str = "",
) -> list[Probe]:
    """``ports``: the host's declared ports with the fleet's answer for this peer; without
    them (and with ``trust_all``) any protected mesh packet must be admitted."""

    def inbound(proto: str, port: int | None = None, **kw: Any) -> Packet:
        return Packet(peer_public, own_public, proto, port, port, in_iface=interface, **kw)

    def outbound(proto: str, port: int | None = None, **kw: Any) -> Packet:
        return Packet(own_public, peer_public, proto, port, port, out_iface=interface, **kw)

    ps = [
        Probe("IKE udp 500 in", "INPUT", inbound("udp", 500), True),
        Probe("NAT-T/ESP-in-UDP udp 4500 in", "INPUT", inbound("udp", 4500), True),
        Probe("ESP in", "INPUT", inbound("esp"), True),
        Probe("AH in", "INPUT", inbound("ah"), True),
        Probe("IKE udp 500 out", "OUTPUT", outbound("udp", 500), True),
        Probe("NAT-T/ESP-in-UDP udp 4500 out", "OUTPUT", outbound("udp", 4500), True),
        Probe("ESP out", "OUTPUT", outbound("esp"), True),
        Probe("AH out", "OUTPUT", outbound("ah"), True),
    ]

    def mesh(
        src: IPv4Address, dst: IPv4Address, port: int = PROBE_PORT, proto: str = "tcp", **kw: Any
    ) -> Packet:
        return Packet(src, dst, proto, 40000, port, ctstate="NEW", syn=proto == "tcp", **kw)

    if mode is MeshMode.IPIP:
        ps += [
            Probe("IP-IP in, IPsec-protected", "INPUT", inbound("ipencap", ipsec=True), True),
            Probe("IP-IP in, clear text", "INPUT", inbound("ipencap", ipsec=False), False),
            Probe("IP-IP out, clear text", "OUTPUT", outbound("ipencap", ipsec=False), False),
        ]
        protected: dict[str, Any] = {"in_iface": peer_tunnel or "ipip-peer"}
        where = f"out of {peer_tunnel or 'its tunnel'}"
    elif datapath is Datapath.LIBIPSEC:
        protected = {"in_iface": LIBIPSEC_IFACE}
        where = f"on {LIBIPSEC_IFACE}"
    else:
        protected = {"in_iface": interface, "ipsec": True}
        where = "with an IPsec policy"
    if mode is not MeshMode.IPIP:
        out_kw: dict[str, Any] = (
            {"out_iface": LIBIPSEC_IFACE}
            if datapath is Datapath.LIBIPSEC
            else {"out_iface": interface, "ipsec": True}
        )
        ps.append(
            Probe(f"mesh traffic out {where}", "OUTPUT", mesh(own_internal, peer_internal, **out_kw), True)
        )
    for pp in ports:
        verdict = "declared" if pp.admit else "not declared"
        ps.append(
            Probe(
                f"mesh traffic in {where} to {pp.label} ({verdict})",
                "INPUT",
                mesh(peer_internal, own_internal, pp.port, pp.protocol, **protected),
                pp.admit,
            )
        )
    spare = undeclared_port({pp.port for pp in ports})
    what = "any port (mesh.trust: all)" if trust_all else f"port {spare} (declared for nobody)"
    ps.append(
        Probe(
            f"mesh traffic in {where} to {what}",
            "INPUT",
            mesh(peer_internal, own_internal, spare, **protected),
            trust_all,
        )
    )
    clear_in = mesh(peer_internal, own_internal, in_iface=interface, ipsec=False)
    clear_out = mesh(own_internal, peer_internal, out_iface=interface, ipsec=False)
    ps.append(Probe(f"mesh traffic in, clear text on {interface}", "INPUT", clear_in, False))
    for pp in ports:
        if pp.admit:
            clear = mesh(peer_internal, own_internal, pp.port, pp.protocol, in_iface=interface, ipsec=False)
            ps.append(
                Probe(f"mesh traffic in, clear text on {interface} to {pp.label}", "INPUT", clear, False)
            )
    if mode is not MeshMode.IPIP:
        ps.append(Probe(f"mesh traffic out, clear text on {interface}", "OUTPUT", clear_out, False))
    return ps


class PairArgs(TypedDict, total=False):
    """``probes``' arguments, which ``check`` passes on."""

    own_public: Required[IPv4Address]
    peer_public: Required[IPv4Address]
    own_internal: Required[IPv4Address]
    peer_internal: Required[IPv4Address]
    interface: Required[str]
    mode: Required[MeshMode]
    datapath: Required[Datapath]
    ports: Sequence[PortProbe]
    trust_all: bool
    peer_tunnel: str


def check(host: str, peer: str, facts: HostFacts, **pair: Unpack[PairArgs]) -> Check:
    if facts.error is not None:
        return failed(host, peer, NAME, f"cannot read {host}: {facts.error}")
    sec = facts.get("iptables")
    if sec is None or not sec.ok:
        why = (sec.err or sec.out).strip().splitlines()[-1:] if sec else ["not run"]
        return failed(host, peer, NAME, f"iptables-save failed on {host}: {why[0] if why else '?'}")
    if "*filter" not in sec.out:
        return failed(host, peer, NAME, f"{host} has no filter table loaded (iptables-save printed none)")
    bad: list[str] = []
    good: list[str] = []
    for p in probes(**pair):
        try:
            v = evaluate(_for_packet(_prepare(sec.out), p.packet), p.chain, p.packet)
        except ParseError as err:
            return failed(host, peer, NAME, f"cannot evaluate the live ruleset of {host}: {err}")
        assert v is not None  # depth 0 always ends with the chain policy
        if v.accepted == p.admit:
            good.append(p.what)
            continue
        by = f"`{v.rule}`" if v.rule else v.reason
        if p.admit:
            bad.append(f"{p.what} from/to {peer} is refused by {by}")
        elif "clear text" in p.what:
            bad.append(f"{p.what} from/to {peer} is admitted by {by} (must go through IPsec)")
        else:
            bad.append(f"{p.what} from/to {peer} is admitted by {by} (least privilege)")
    evidence = f"{len(good)} of {len(good) + len(bad)} probes as required: " + ", ".join(good)
    if bad:
        return failed(host, peer, NAME, "; ".join(bad), evidence)
    return passed(host, peer, NAME, evidence)
