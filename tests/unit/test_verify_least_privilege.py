"""verify's least-privilege checks, pure, plus the connect helper run for real in a private
network namespace: the evaluator's declared/undeclared port probes (``firewall``), the IPv6
ruleset probes (``firewall.v6``), and the real-connect check (``firewall.reach``) judging
connected / reset / dropped / unreachable against what the fleet declares."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import replace
from ipaddress import IPv6Address
from types import MappingProxyType

import pytest
from network_fleets import example_fleet

from reconciler.domains import firewall as fw_domain
from reconciler.domains import firewall6 as fw6_domain
from reconciler.fleet.model import Datapath, Fleet, MeshMode, MeshTrust
from reconciler.verify import datapath, firewall, firewall6, reach
from reconciler.verify.checks import Status
from reconciler.verify.facts import HostFacts, Section
from reconciler.verify.runner import reach_expects, v6_probes


def fleet(trust: MeshTrust = MeshTrust.LEAST) -> Fleet:
    f = example_fleet(mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC)
    return replace(f, mesh=replace(f.mesh, trust=trust))


def facts(host: str, **sections: str) -> HostFacts:
    return HostFacts(host, MappingProxyType({k: Section(k, 0, v) for k, v in sections.items()}))


def v4_check(f: Fleet, host: str, peer: str, rules: str) -> object:
    h, p = f.host(host), f.host(peer)
    return firewall.check(
        host,
        peer,
        facts(host, iptables=rules),
        own_public=h.public_address,
        peer_public=p.public_address,
        own_internal=h.internal_address,
        peer_internal=p.internal_address,
        interface="eth0",
        mode=f.mesh.mode,
        datapath=f.mesh.datapath,
        ports=firewall.port_probes(f, h, p),
        trust_all=f.mesh.trust is MeshTrust.ALL,
    )


def test_port_probes_give_the_fleets_answer_per_peer() -> None:
    f = fleet()
    db1, web1, db2 = f.host("db1"), f.host("web1"), f.host("db2")
    assert [(p.port, p.admit) for p in firewall.port_probes(f, db1, web1)] == [(22, False), (3306, True)]
    assert [(p.port, p.admit) for p in firewall.port_probes(f, db1, db2)] == [(22, False), (3306, False)]
    assert [(p.port, p.admit) for p in firewall.port_probes(f, web1, db2)] == [
        (22, False),
        (80, True),
        (443, True),
    ]
    everyone = fleet(MeshTrust.ALL)
    assert all(p.admit for p in firewall.port_probes(everyone, db1, db2))
    assert [e.label for e in reach_expects(f, db1, web1)] == ["22/tcp (management SSH)", "3306/tcp (mysql)"]


def test_the_rendered_least_privilege_ruleset_passes_and_a_trusted_one_fails() -> None:
    f = fleet()
    rules = fw_domain.ruleset(f, f.host("db1"))
    for peer in ("web1", "db2"):
        check = v4_check(f, "db1", peer, rules)
        assert check.status is Status.PASS, check  # type: ignore[attr-defined]
    assert "3306/tcp (mysql) (not declared)" in v4_check(f, "db1", "db2", rules).evidence  # type: ignore[attr-defined]
    trusting = fw_domain.ruleset(fleet(MeshTrust.ALL), f.host("db1"))
    bad = v4_check(f, "db1", "db2", trusting)
    assert bad.status is Status.FAIL  # type: ignore[attr-defined]
    cause = bad.cause  # type: ignore[attr-defined]
    assert (
        "to 3306/tcp (mysql) (not declared) from/to db2 is admitted by" in cause
        and "(least privilege)" in cause
    )
    assert "-s 10.99.0.22/32 -d 10.99.0.21/32 -i ipsec0 -j ACCEPT" in cause
    # under mesh.trust: all the same trusting ruleset is what the fleet asks for
    assert v4_check(fleet(MeshTrust.ALL), "db1", "db2", trusting).status is Status.PASS  # type: ignore[attr-defined]


def test_ipv6_probes_pass_on_the_rendered_rules_and_catch_an_open_ruleset() -> None:
    f = fleet()
    for name in f.host_names():
        host = f.host(name)
        text = fw6_domain.ruleset(f, host)
        check = firewall6.check(name, facts(name, ip6tables=text), v6_probes(f, host))
        assert check.status is Status.PASS, check
    db1 = f.host("db1")
    assert (
        "3306/tcp (mysql) from 2001:db8::11"
        in firewall6.check(
            "db1", facts("db1", ip6tables=fw6_domain.ruleset(f, db1)), v6_probes(f, db1)
        ).evidence
    )
    wide_open = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    bad = firewall6.check("db1", facts("db1", ip6tables=wide_open), v6_probes(f, db1))
    assert bad.status is Status.FAIL
    assert (
        "3306/tcp (mysql) from 2001:db8:ffff:ffff::1 (not a source) is admitted by INPUT policy ACCEPT"
        in bad.cause
    )
    assert "neighbour solicitation from off the link (hop limit 64) is admitted" in bad.cause
    nothing = firewall6.check("db1", facts("db1", ip6tables="NO-IPV6"), v6_probes(f, db1))
    assert nothing.status is Status.SKIP and "no IPv6" in nothing.cause
    assert v6_probes(f, replace(db1, public_address_v6=None))[0].packet.dst == IPv6Address("2001:db8::1")


def probe(reach_out: str, ping_ok: bool = True) -> MappingProxyType[str, Section]:
    ping = (
        "3 packets transmitted, 3 received, 0% packet loss"
        if ping_ok
        else "3 packets transmitted, 0 received"
    )
    return MappingProxyType(
        {"reach": Section("reach", 0, reach_out), "ping:10.99.0.21": Section("p", 0, ping)}
    )


LISTEN = """  sl  local_address rem_address   st
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2
"""


def reach_check(peer: str, out: str, *, ping_ok: bool = True, listen: str = LISTEN) -> object:
    f = fleet()
    return reach.check(
        "db1",
        peer,
        expects=reach_expects(f, f.host("db1"), f.host(peer)),
        host_internal="10.99.0.21",
        probe=probe(out, ping_ok),
        probe_error=None,
        listen=Section("listen", 0, listen),
    )


def test_reach_judges_real_connect_outcomes() -> None:
    assert reach.parse_listening(LISTEN) == {22}  # 127.0.0.1:3306 is not reachable from outside
    # web1 is declared for 3306 (role web): nothing listens, the kernel resets = admitted
    ok = reach_check("web1", "10.99.0.21 3306 fail Connection refused\n")
    assert ok.status is Status.PASS, ok  # type: ignore[attr-defined]
    assert "db1:3306 (3306/tcp (mysql)) from web1: admitted (nothing listens" in ok.evidence  # type: ignore[attr-defined]
    assert "db1:22 (22/tcp (management SSH)) from web1: dropped (not declared)" in ok.evidence  # type: ignore[attr-defined]
    # db2 is not declared: both dropped
    assert reach_check("db2", "").status is Status.PASS  # type: ignore[attr-defined]
    # ... but a drop proves nothing when the mesh path itself is down
    unsure = reach_check("db2", "", ping_ok=False)
    assert unsure.status is Status.SKIP and "the mesh path did not answer" in unsure.cause  # type: ignore[attr-defined]
    # sshd reached over the mesh by a peer: least privilege broken
    bad = reach_check("db2", "10.99.0.21 22 open \n")
    assert bad.status is Status.FAIL  # type: ignore[attr-defined]
    assert "db1:22 (22/tcp (management SSH)) from db2: connected although not declared for db2" in bad.cause  # type: ignore[attr-defined]
    # a reset from an undeclared port also means the SYN got in
    assert reach_check("db2", "10.99.0.21 3306 fail Connection refused\n").status is Status.FAIL  # type: ignore[attr-defined]
    # a declared port that gets no answer, or no route
    dropped = reach_check("web1", "")
    assert "declared for web1 but dropped" in dropped.cause  # type: ignore[attr-defined]
    noroute = reach_check("web1", "10.99.0.21 3306 fail No route to host\n")
    assert noroute.status is Status.FAIL and "No route to host" in noroute.cause  # type: ignore[attr-defined]
    # a declared port that resets although something listens there
    listening = LISTEN + "   2: 00000000:0CEA 00000000:0000 0A 0 0 0 0 0 3\n"
    refused = reach_check("web1", "10.99.0.21 3306 fail Connection refused\n", listen=listening)
    assert "refused (Connection refused) although db1 listens there" in refused.cause  # type: ignore[attr-defined]


def test_a_connect_probe_that_could_not_run_is_a_failure_not_a_pass() -> None:
    broken = reach_check("db2", "REACH-ERROR cannot make a FIFO in /tmp/x/reach")
    assert broken.status is Status.FAIL  # type: ignore[attr-defined]
    assert broken.cause == "the connect probe on db2 failed: cannot make a FIFO in /tmp/x/reach"  # type: ignore[attr-defined]


def test_probe_arguments_carry_the_connects() -> None:
    req = datapath.ProbeRequest("eth0", "10.99.0.11", ("10.99.0.21",), connects=(("10.99.0.21", 22),))
    args = req.args()
    assert args[5:] == ["1", "1500000", "10.99.0.21", "10.99.0.21", "22"]


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("bash") is None, reason="needs unshare, bash"
)
def test_the_connect_helper_tells_open_reset_dropped_and_unreachable_apart() -> None:
    """The probe's own shell function, run for real in a private network namespace (lo only,
    one DROP rule): no connect outlives the timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        script = (
            datapath.REACH_FUNCTION
            + r"""
ip link set lo up
iptables -A INPUT -p tcp --dport 81 -j DROP
python3 -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1", 80)); s.listen(); time.sleep(10)' &
srv=$!
i=0; while ! grep -q ':0050 00000000:0000 0A' /proc/net/tcp && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
start=$(date +%s%N)
reach "$1" 1000000 127.0.0.1 80 127.0.0.1 81 127.0.0.1 82 10.9.9.9 80
echo "took $(( ($(date +%s%N) - start) / 1000000 )) ms"
rm -f "$1"/*; reach "$1" 5000000 127.0.0.1 80 127.0.0.1 82 >/dev/null
echo "fast $(( ($(date +%s%N) - start) / 1000000 )) ms"
kill $srv
sleep 0.2
for p in $(pgrep -x bash); do
  tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'reach .*127.0.0.1 81 ' && echo "LEFTOVER $p"
done
true
"""
        )
        res = subprocess.run(
            ["unshare", "--net", "--", "sh", "-c", script, "sh", tmp],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0 and "Operation not permitted" in res.stderr:
            pytest.skip(f"no network namespace here: {res.stderr.strip()}")
    results = reach.parse_reach(res.stdout)
    assert results[("127.0.0.1", 80)].outcome == "open", res
    assert ("127.0.0.1", 81) not in results  # dropped: no answer, killed after the timeout
    assert results[("127.0.0.1", 82)].outcome == "refused"
    assert results[("10.9.9.9", 80)].outcome == "unreachable"
    assert "LEFTOVER" not in res.stdout
    took = int(res.stdout.split("took ", 1)[1].split()[0])
    fast = int(res.stdout.split("fast ", 1)[1].split()[0]) - took
    assert 950 <= took < 3000, res.stdout  # the dropped connect waited for the timeout (1 s)
    assert fast < 1000, res.stdout  # with every connect answered it returns at once, not at 5 s
