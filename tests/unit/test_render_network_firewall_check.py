"""The conservative iptables evaluator behind the management-SSH lockout check."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from reconciler.netfilter.check import Packet, ssh_admitted, verdict
from reconciler.netfilter.iptables import ParseError

ME = IPv4Address("192.0.2.11")
ADMIN = IPv4Address("192.0.2.254")


def table(*rules: str, input_policy: str = "DROP", chains: tuple[str, ...] = ()) -> str:
    lines = ["*filter", f":INPUT {input_policy} [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{c} - [0:0]" for c in chains]
    return "\n".join([*lines, *rules, "COMMIT", ""])


def admitted(text: str) -> bool:
    return not ssh_admitted(text, source=ADMIN, address=ME, port=22, interface="eth0")


def test_ssh_rule_before_the_policy_admits() -> None:
    assert admitted(table("-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT"))
    assert not admitted(table("-A INPUT -s 192.0.2.253/32 -p tcp -m tcp --dport 22 -j ACCEPT"))
    assert not admitted(table("-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT"))


def test_a_drop_before_the_ssh_rule_locks_out_and_is_named() -> None:
    text = table("-A INPUT -i eth0 -j DROP", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT")
    (v,) = ssh_admitted(text, source=ADMIN, address=ME, port=22, interface="eth0")
    assert v.rule == "-A INPUT -i eth0 -j DROP" and v.line == 5


def test_unknown_matches_are_pessimistic() -> None:
    # an ACCEPT we cannot judge is not relied on; a DROP we cannot judge is assumed to hit
    assert not admitted(table("-A INPUT -p tcp -m recent --rcheck --name x -j ACCEPT"))
    assert not admitted(
        table(
            "-A INPUT -m hashlimit --hashlimit-above 1/sec -j DROP",
            "-A INPUT -p tcp -j ACCEPT",
            input_policy="DROP",
        )
    )
    assert not admitted(table("-A INPUT -m limit --limit 1/min -j REJECT", "-A INPUT -p tcp -j ACCEPT"))


def test_negation_interfaces_and_conntrack() -> None:
    assert admitted(table("-A INPUT ! -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -j ACCEPT"))
    assert not admitted(table("-A INPUT ! -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -j ACCEPT"))
    assert admitted(table("-A INPUT -i eth+ -p tcp -j ACCEPT"))
    assert not admitted(table("-A INPUT -i ens+ -p tcp -j ACCEPT"))
    assert not admitted(table("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"))


def test_user_chains_return_and_logging() -> None:
    text = table(
        '-A INPUT -j LOG --log-prefix "x: "',
        "-A INPUT -j MGMT",
        "-A MGMT -s 192.0.2.0/24 -j RETURN",
        "-A MGMT -j DROP",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        chains=("MGMT",),
    )
    assert admitted(text)
    assert not ssh_admitted(text, source=ADMIN, address=ME, port=22, interface="eth0")
    other = Packet(src=IPv4Address("203.0.113.1"), dst=ME, proto="tcp", dport=22, in_iface="eth0")
    assert not verdict(text, "INPUT", other).accepted


def test_the_reply_must_leave_too() -> None:
    text = table(
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A OUTPUT -p tcp -m tcp --sport 22 -j DROP",
    )
    (v,) = ssh_admitted(text, source=ADMIN, address=ME, port=22, interface="eth0")
    assert "OUTPUT" in (v.rule or "")


def test_malformed_rulesets_are_errors() -> None:
    with pytest.raises(ParseError):
        verdict("*filter\n:INPUT DROP [0:0]\n-A NOCHAIN -j ACCEPT\nCOMMIT\n", "INPUT", Packet(ME, ME, "tcp"))
    with pytest.raises(ParseError):
        verdict("*filter\n:INPUT DROP [0:0]\n-I INPUT -j ACCEPT\nCOMMIT\n", "INPUT", Packet(ME, ME, "tcp"))
