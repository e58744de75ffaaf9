"""iptables and ip6tables rule lines written exactly as ``iptables-save``/``ip6tables-save``
print them.

Observed rules come from ``iptables-save``; writing desired rules in the same canonical form
(``-s``/``-d`` as CIDR, then ``-i``/``-o``, ``-p`` by name, ``-m tcp``/``-m udp`` spelled out,
``ipencap`` for protocol 4, conntrack states as ``RELATED,ESTABLISHED``; IPv6: compressed
lower-case addresses with ``/128``, ``-p ipv6-icmp -m icmp6 --icmpv6-type N``) makes observed
and desired compare rule by rule. The integration tests check the round trip through the real
``iptables-restore``/``iptables-save``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

Addr = IPv4Address | IPv4Network | IPv6Address | IPv6Network


@functools.lru_cache(maxsize=1 << 14)
def _net(value: Addr) -> str:
    if isinstance(value, IPv4Address):
        return f"{value}/32"
    if isinstance(value, IPv6Address):
        return f"{value}/128"
    return str(ip_network(str(value)))


@dataclass(frozen=True)
class Rule:
    chain: str
    target: str
    src: Addr | None = None
    dst: Addr | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    proto: str | None = None  # tcp, udp, icmp, esp, ah, ipencap, ipv6-icmp
    sport: int | None = None
    dport: int | None = None
    matches: tuple[str, ...] = ()  # extra "-m ..." words, already canonical
    target_args: tuple[str, ...] = ()

    def line(self) -> str:
        return _line(self)


@functools.lru_cache(maxsize=1 << 16)
def _line(rule: Rule) -> str:
    """Cached by value: a mesh repeats each peer's rules in every other host's ruleset."""
    words: list[str] = ["-A", rule.chain]
    if rule.src is not None:
        words += ["-s", _net(rule.src)]
    if rule.dst is not None:
        words += ["-d", _net(rule.dst)]
    if rule.in_iface is not None:
        words += ["-i", rule.in_iface]
    if rule.out_iface is not None:
        words += ["-o", rule.out_iface]
    if rule.proto is not None:
        words += ["-p", rule.proto]
        if rule.proto in ("tcp", "udp") and (rule.sport is not None or rule.dport is not None):
            words += ["-m", rule.proto]
            if rule.sport is not None:
                words += ["--sport", str(rule.sport)]
            if rule.dport is not None:
                words += ["--dport", str(rule.dport)]
    words += list(rule.matches)
    words += ["-j", rule.target]
    words += list(rule.target_args)
    return " ".join(words)


ESTABLISHED = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
INVALID = ("-m", "conntrack", "--ctstate", "INVALID")
IPSEC_IN = ("-m", "policy", "--dir", "in", "--pol", "ipsec")
IPSEC_OUT = ("-m", "policy", "--dir", "out", "--pol", "ipsec")
NO_IPSEC_OUT = ("-m", "policy", "--dir", "out", "--pol", "none")
NO_IPSEC_IN = ("-m", "policy", "--dir", "in", "--pol", "none")
ECHO_REQUEST = ("-m", "icmp", "--icmp-type", "8")

# ICMPv6 types (RFC 4443, RFC 4861) as ip6tables-save prints them
ICMP6_PACKET_TOO_BIG = 2
ICMP6_ECHO_REQUEST = 128
ICMP6_ROUTER_SOLICITATION = 133
ICMP6_ROUTER_ADVERTISEMENT = 134
ICMP6_NEIGHBOUR_SOLICITATION = 135
ICMP6_NEIGHBOUR_ADVERTISEMENT = 136
ON_LINK_ONLY = ("-m", "hl", "--hl-eq", "255")  # neighbour discovery is sent with hop limit 255


def icmp6(kind: int, *extra: str) -> tuple[str, ...]:
    return ("-m", "icmp6", "--icmpv6-type", str(kind), *extra)


# a rate-limited LOG of what the policy is about to drop (``firewall.log_drops``)
LOG_DROPS = Rule(
    "INPUT",
    "LOG",
    matches=("-m", "limit", "--limit", "5/min"),
    target_args=("--log-prefix", '"reconciler-drop: "'),
)


@dataclass(frozen=True)
class Section:
    """Rules under a comment line in the rendered file (comments are dropped by
    iptables-restore, so they never reach the observed side)."""

    comment: str
    rules: tuple[Rule, ...]


def restore_text(header: str, policies: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """A complete filter table in iptables-restore format."""
    out = [header.rstrip("\n"), "*filter"]
    out += [f":{chain} {policy} [0:0]" for chain, policy in policies]
    for section in sections:
        if not section.rules:
            continue
        out.append(f"# {section.comment}")
        out += [r.line() for r in section.rules]
    out.append("COMMIT")
    return "\n".join(out) + "\n"
