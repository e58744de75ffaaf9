"""Evaluate an iptables-restore or ip6tables-restore ``filter`` table for one packet,
conservatively.

Used to refuse a rendered ruleset that would lock out management SSH. The evaluator knows the
matches the firewall domain renders (IPv4 and IPv6 addresses, interfaces with ``+``, protocols,
tcp/udp ports, conntrack/state, policy, icmp, icmp6, hl, comment, limit) and is pessimistic
about everything
else: a rule it cannot decide is assumed to match when it would drop the packet and assumed not
to match when it would accept it. So "admitted" is only answered when it is certain. Pure.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv6Address, ip_network

from reconciler.netfilter.iptables import Table, parse_filter

PROTOCOLS = {
    "0": "all",
    "1": "icmp",
    "4": "ipencap",
    "6": "tcp",
    "17": "udp",
    "50": "esp",
    "51": "ah",
    "58": "ipv6-icmp",
    "icmpv6": "ipv6-icmp",
}
ICMP_TYPES = {"echo-request": 8, "echo-reply": 0}
ICMP6_TYPES = {
    "packet-too-big": 2,
    "echo-request": 128,
    "echo-reply": 129,
    "router-solicitation": 133,
    "router-advertisement": 134,
    "neighbour-solicitation": 135,
    "neighbor-solicitation": 135,
    "neighbour-advertisement": 136,
    "neighbor-advertisement": 136,
}
Address = IPv4Address | IPv6Address
TERMINAL_DROP = ("DROP", "REJECT")
NON_TERMINAL = ("LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "NOTRACK", "CT", "TRACE", "AUDIT")


class Tri(Enum):
    NO = 0
    YES = 1
    MAYBE = 2


def _and(a: Tri, b: Tri) -> Tri:
    if Tri.NO in (a, b):
        return Tri.NO
    if Tri.MAYBE in (a, b):
        return Tri.MAYBE
    return Tri.YES


@dataclass(frozen=True)
class Packet:
    src: Address
    dst: Address
    proto: str  # tcp, udp, icmp, esp, ah, ipencap, ipv6-icmp
    sport: int | None = None
    dport: int | None = None
    in_iface: str | None = None  # INPUT/FORWARD
    out_iface: str | None = None  # OUTPUT/FORWARD
    ctstate: str = "NEW"
    syn: bool = False
    ipsec: bool = False  # arrived decrypted / leaves to be encrypted
    icmp_type: int | None = None  # ICMP or ICMPv6 type
    hop_limit: int | None = None  # TTL / hop limit on arrival (None: unknown)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    line: int | None  # 1-based line in the ruleset of the deciding rule; None = chain policy
    rule: str | None
    reason: str


def _iface(pattern: str, name: str | None) -> Tri:
    if name is None:
        return Tri.MAYBE
    if pattern.endswith("+"):
        return Tri.YES if name.startswith(pattern[:-1]) else Tri.NO
    return Tri.YES if name == pattern else Tri.NO


def _ports(spec: str, value: int | None) -> Tri:
    if value is None:
        return Tri.NO
    if ":" in spec:
        lo, hi = spec.split(":", 1)
        return Tri.YES if int(lo or 0) <= value <= int(hi or 65535) else Tri.NO
    return Tri.YES if int(spec) == value else Tri.NO


def _proto(name: str) -> str:
    return PROTOCOLS.get(name, name)


@functools.lru_cache(maxsize=8192)
def _network(text: str) -> tuple[int, int, int]:
    """An -s/-d value as (IP version, network, mask) integers, parsed once per process (a mesh
    ruleset repeats the same addresses in every rule set of every host)."""
    net = ip_network(text, strict=False)
    return net.version, int(net.network_address), int(net.netmask)


def _within(addr: Address, text: str) -> bool:
    version, base, mask = _network(text)
    return addr.version == version and (int(addr) & mask) == base


def _icmp_type(arg: str, names: dict[str, int]) -> int:
    wanted = names.get(arg)
    if wanted is None:
        head = arg.split("/")[0]
        wanted = int(head) if head.isdigit() else -1
    return wanted


def _hop_limit(op: str, arg: str, value: int | None) -> Tri:
    if value is None or not arg.isdigit():
        return Tri.MAYBE
    want = int(arg)
    ok = {"--hl-eq": value == want, "--hl-lt": value < want, "--hl-gt": value > want}.get(op)
    return Tri.MAYBE if ok is None else (Tri.YES if ok else Tri.NO)


def match(words: list[str], pkt: Packet) -> tuple[Tri, str, list[str]]:
    """(does the rule match, its target, the target's arguments)."""
    result = Tri.YES
    target = ""
    target_args: list[str] = []
    module = ""
    i = 0
    negate = False
    while i < len(words):
        w = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        if w == "!":
            negate = True
            i += 1
            continue
        step = 2
        t: Tri
        if w in ("-j", "--jump", "-g", "--goto"):
            target = arg
            target_args = words[i + 2 :]
            if w in ("-g", "--goto"):
                result = _and(result, Tri.MAYBE)
            break
        if w in ("-s", "--source"):
            t = Tri.YES if _within(pkt.src, arg) else Tri.NO
        elif w in ("-d", "--destination"):
            t = Tri.YES if _within(pkt.dst, arg) else Tri.NO
        elif w in ("-i", "--in-interface"):
            t = _iface(arg, pkt.in_iface)
        elif w in ("-o", "--out-interface"):
            t = _iface(arg, pkt.out_iface)
        elif w in ("-p", "--protocol"):
            p = _proto(arg)
            t = Tri.YES if p in ("all", pkt.proto) else Tri.NO
        elif w in ("-m", "--match"):
            module = arg
            t = Tri.YES
        elif w in ("--sport", "--source-port") and module in ("tcp", "udp"):
            t = _ports(arg, pkt.sport)
        elif w in ("--dport", "--destination-port") and module in ("tcp", "udp"):
            t = _ports(arg, pkt.dport)
        elif w == "--syn" and module == "tcp":
            t = Tri.YES if pkt.syn else Tri.NO
            step = 1
        elif w in ("--ctstate", "--state") and module in ("conntrack", "state"):
            t = Tri.YES if pkt.ctstate in arg.split(",") else Tri.NO
        elif w == "--dir" and module == "policy":
            t = Tri.YES  # the direction is the chain's; checked with --pol
        elif w == "--pol" and module == "policy":
            t = Tri.YES if (arg == "ipsec") == pkt.ipsec else Tri.NO
        elif w == "--icmp-type" and module == "icmp":
            t = Tri.YES if pkt.proto == "icmp" and pkt.icmp_type == _icmp_type(arg, ICMP_TYPES) else Tri.NO
        elif w == "--icmpv6-type" and module == "icmp6":
            wanted = _icmp_type(arg, ICMP6_TYPES)
            t = Tri.YES if pkt.proto == "ipv6-icmp" and pkt.icmp_type == wanted else Tri.NO
        elif w in ("--hl-eq", "--hl-lt", "--hl-gt") and module == "hl":
            t = _hop_limit(w, arg, pkt.hop_limit)
        elif module == "comment" and w == "--comment":
            t = Tri.YES
        elif module == "limit" and w in ("--limit", "--limit-burst"):
            t = Tri.MAYBE
        else:
            # unknown option: we cannot tell; it may or may not take an argument
            t = Tri.MAYBE
            step = 2 if arg and not arg.startswith("-") else 1
        if negate:
            t = {Tri.YES: Tri.NO, Tri.NO: Tri.YES, Tri.MAYBE: Tri.MAYBE}[t]
            negate = False
        result = _and(result, t)
        if result is Tri.NO:
            return Tri.NO, "", []  # cannot match: the rest of the rule does not matter
        i += step
    return result, target, target_args


def evaluate(table: Table, chain: str, pkt: Packet, depth: int = 0) -> Verdict | None:
    """The verdict of ``chain`` for ``pkt``; None if a user chain returns without one."""
    if depth > 16:
        return Verdict(False, None, None, "chains nest too deep")
    for number, words in table.rules.get(chain, []):
        m, target, _ = match(words, pkt)
        if m is Tri.NO or target == "" or target in NON_TERMINAL:
            continue
        rule = f"-A {chain} " + " ".join(shlex.quote(w) for w in words)
        if target in TERMINAL_DROP:
            return Verdict(False, number, rule, f"{target} at line {number}")
        if target == "ACCEPT":
            if m is Tri.YES:
                return Verdict(True, number, rule, f"ACCEPT at line {number}")
            continue
        if target == "RETURN":
            if m is Tri.YES:
                return None
            continue
        if target in table.rules:
            sub = evaluate(table, target, pkt, depth + 1)
            if sub is None:
                continue
            if not sub.accepted or m is Tri.YES:
                return sub
            continue
        # an unknown terminating target: it might drop
        return Verdict(False, number, rule, f"unknown target {target} at line {number}")
    if depth > 0:
        return None
    policy = table.policies.get(chain, "ACCEPT")
    return Verdict(policy == "ACCEPT", None, None, f"{chain} policy {policy}")


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> Table:
    """One parse per ruleset text (render asks several verdicts of the same ruleset);
    ``evaluate`` only reads the table."""
    return parse_filter(text)


def verdict(text: str, chain: str, pkt: Packet) -> Verdict:
    result = evaluate(_parsed(text), chain, pkt)
    assert result is not None  # depth 0 always ends with the policy
    return result


def ssh_admitted(text: str, *, source: Address, address: Address, port: int, interface: str) -> list[Verdict]:
    """The verdicts that would refuse a management SSH session from ``source`` to
    ``address:port`` arriving on ``interface`` (empty list = admitted): the SYN in INPUT and
    the SYN-ACK leaving through OUTPUT."""
    return list(_ssh_refusals(text, source, address, port, interface))


@functools.lru_cache(maxsize=256)
def _ssh_refusals(
    text: str, source: Address, address: Address, port: int, interface: str
) -> tuple[Verdict, ...]:
    """Cached: every render of a new commit checks each host's ruleset again, and a push that
    does not touch the firewall renders the same text (Verdicts are immutable)."""
    syn = Packet(
        src=source,
        dst=address,
        proto="tcp",
        sport=50000,
        dport=port,
        in_iface=interface,
        ctstate="NEW",
        syn=True,
    )
    reply = Packet(
        src=address,
        dst=source,
        proto="tcp",
        sport=port,
        dport=50000,
        out_iface=interface,
        ctstate="ESTABLISHED",
    )
    bad = []
    for chain, pkt in (("INPUT", syn), ("OUTPUT", reply)):
        v = verdict(text, chain, pkt)
        if not v.accepted:
            bad.append(v)
    return tuple(bad)
