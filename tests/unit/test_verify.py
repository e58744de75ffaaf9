# ruff: noqa: E501  (recorded log, capture and parser lines are kept verbatim)
"""verify's parsers and evaluators on outputs recorded from a real 4-host lab mesh
(strongSwan, tunnel mode, libipsec): tests/fixtures/verify/mesh4-libipsec.json holds the framed
sections each host returned (swanctl --pretty views, key hashes, iptables-save, charon log,
tcpdump capture and pings, curl headers, apparmor_parser). The firewall parts (iptables-save,
ip6tables-save, listening sockets, the probe's TCP connects) were recorded again from a real lab
once the mesh became least privilege (tests/fixtures/verify/record_firewall_sections.py).
Faults are the same data with one thing changed the way the fault changes it on a live host."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.kinds import ipsec_state
from reconciler.verify import datapath, ipsec_log
from reconciler.verify.apache import parse_headers, sample_path
from reconciler.verify.checks import Status, VerifyReport
from reconciler.verify.facts import HostFacts, Section, split_sections
from reconciler.verify.report import render_text, to_json
from reconciler.verify.runner import evaluate

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tests" / "fixtures" / "verify" / "mesh4-libipsec.json"


def example_fleet(tmp: Path, *, datapath: str = "libipsec") -> Fleet:
    repo = tmp / "fleet"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    text = (repo / "fleet.yaml").read_text()
    text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", f"datapath: {datapath}")
    (repo / "fleet.yaml").write_text(text)
    return load_fleet(repo)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return example_fleet(tmp_path_factory.mktemp("verify"))


def recorded() -> dict[str, HostFacts]:
    data = json.loads(RECORDED.read_text())

    def secs(d: dict[str, dict[str, object]]) -> MappingProxyType[str, Section]:
        return MappingProxyType({k: Section(**v) for k, v in d.items()})  # type: ignore[arg-type]

    return {h: HostFacts(h, secs(v["sections"]), secs(v["probe"])) for h, v in data.items()}


def with_section(f: HostFacts, name: str, **changes: object) -> HostFacts:
    sections = dict(f.sections)
    sections[name] = replace(sections[name], **changes)  # type: ignore[arg-type]
    return replace(f, sections=MappingProxyType(sections))


def report_of(fleet: Fleet, facts: dict[str, HostFacts]) -> VerifyReport:
    names = list(fleet.host_names())
    pairs = [(h.name, p.name) for h in fleet.hosts for p in fleet.peers_of(h)]
    return VerifyReport.build(evaluate(fleet, names, facts), names, pairs)


# ---------------------------------------------------------------- the healthy mesh


def test_recorded_healthy_mesh_passes_every_check_that_can_run(fleet: Fleet) -> None:
    report = report_of(fleet, recorded())
    bad = [c for c in report.checks if c.status is Status.FAIL]
    assert not bad, bad
    assert len(report.pairs) == 12 and report.failed_pairs() == set()
    skips = [c for c in report.checks if c.status is Status.SKIP]
    assert {c.name for c in skips} == {"apparmor.loaded"}
    assert all("AppArmor LSM is not active" in c.cause for c in skips)
    for host, peer in report.pairs:
        names = {c.name for c in report.for_pair(host, peer)}
        assert names == {
            "firewall",
            "firewall.reach",
            "ipsec.config",
            "ipsec.keys",
            "ipsec.ike",
            "ipsec.child",
            "ipsec.log",
            "datapath",
        }
        dp = report.get(host, peer, "datapath")
        assert dp.details["esp_udp_encapsulated"] > 0 and dp.details["clear_icmp"] == 0  # type: ignore[operator]
        assert dp.details["ping_received"] == 3
    for host in ("db1", "db2", "web1", "web2"):
        assert report.get(host, "", "firewall.v6").status is Status.PASS
    # the recorded connects: db1 reached Apache on web1 over the mesh (open to anyone), the
    # web host reached db1's MySQL port (declared for role web: reset, nothing listens), and
    # nobody reached a declared-for-nobody port or sshd over the mesh
    reach = report.get("web1", "db1", "firewall.reach")
    assert "web1:80 (80/tcp (http)) from db1: connected (declared)" in reach.evidence
    assert "web1:22 (22/tcp (management SSH)) from db1: dropped (not declared)" in reach.evidence
    mysql = report.get("db1", "db2", "firewall.reach")
    assert "db1:3306 (3306/tcp (mysql)) from db2: dropped (not declared)" in mysql.evidence
    assert "admitted (nothing listens" in report.get("db1", "web1", "firewall.reach").evidence
    assert report.get("web1", "", "apache.shop").status is Status.PASS
    assert report.get("db1", "", "apparmor.usr.sbin.mysqld").status is Status.PASS
    assert report.exit_code() == 0


def test_recovered_log_error_passes_but_is_reported(fleet: Fleet) -> None:
    # web1 got NO_PROPOSAL_CHOSEN from web2 (whose config was not loaded yet), then established
    report = report_of(fleet, recorded())
    assert "recovered" in report.get("web1", "web2", "ipsec.log").evidence


# ---------------------------------------------------------------- faults


def test_peer_with_charon_stopped_fails_exactly_its_pairs(fleet: Fleet) -> None:
    facts = recorded()
    db2 = with_section(facts["db2"], "charon", rc=1, out="")
    db2 = with_section(db2, "stats", rc=1, out="", err="connecting to 'unix:///var/run/charon.vici' failed")
    db2 = with_section(db2, "sas", rc=1, out="")
    facts["db2"] = db2
    report = report_of(fleet, facts)
    assert report.failed_pairs() == {p for p in report.pairs if "db2" in p}
    cause = report.get("web1", "db2", "ipsec.ike").cause
    assert "peer charon is not running on db2" in cause
    assert "charon is not running on db2" in report.get("db2", "", "ipsec.daemon").cause
    assert report.exit_code() == 1


def test_firewall_dropping_nat_t_from_one_peer_fails_that_pair(fleet: Fleet) -> None:
    facts = recorded()
    rules = facts["web1"].get("iptables").out  # type: ignore[union-attr]
    drop = "-A INPUT -s 192.0.2.21/32 -p udp -m udp --dport 4500 -j DROP\n"
    first = rules.index("-A INPUT")
    facts["web1"] = with_section(facts["web1"], "iptables", out=rules[:first] + drop + rules[first:])
    report = report_of(fleet, facts)
    assert report.failed_pairs() == {("web1", "db1")}
    cause = report.get("web1", "db1", "firewall").cause
    assert "NAT-T/ESP-in-UDP udp 4500 in from/to db1 is refused" in cause and "--dport 4500 -j DROP" in cause


def test_clear_text_mesh_traffic_admitted_is_a_failure(fleet: Fleet) -> None:
    facts = recorded()
    rules = facts["web2"].get("iptables").out  # type: ignore[union-attr]
    guard = "-A INPUT -s 10.99.0.0/24 -i eth0 -m policy --dir in --pol none -j DROP"
    assert guard in rules
    # the clear-text guard swapped for a sloppy accept of one peer's internal address
    facts["web2"] = with_section(
        facts["web2"], "iptables", out=rules.replace(guard, "-A INPUT -s 10.99.0.11/32 -j ACCEPT")
    )
    report = report_of(fleet, facts)
    # web1's clear text gets in anywhere; without the guard, a forged mesh source in clear also
    # reaches the port open to anyone (80) from the other peers' addresses
    assert report.failed_pairs() == {("web2", "web1"), ("web2", "db1"), ("web2", "db2")}
    cause = report.get("web2", "web1", "firewall").cause
    assert "mesh traffic in, clear text on eth0 from/to web1 is admitted" in cause
    db1 = report.get("web2", "db1", "firewall").cause
    assert db1.startswith("mesh traffic in, clear text on eth0 to 80/tcp (http) from/to db1 is admitted by")
    assert (
        "to port 9 (declared for nobody) from/to web1 is admitted" in cause and "(least privilege)" in cause
    )


def test_a_peer_that_reaches_an_undeclared_port_fails_that_pair_only(fleet: Fleet) -> None:
    facts = recorded()
    # web1's probe: db1's sshd answered over the mesh (someone opened it to the mesh by hand)
    reach = facts["web1"].probe["reach"]
    probe = dict(facts["web1"].probe)
    probe["reach"] = replace(reach, out=reach.out + "\n10.99.0.21 22 open ")
    facts["web1"] = replace(facts["web1"], probe=MappingProxyType(probe))
    report = report_of(fleet, facts)
    assert report.failed_pairs() == {("db1", "web1")}
    cause = report.get("db1", "web1", "firewall.reach").cause
    assert (
        cause
        == "db1:22 (22/tcp (management SSH)) from web1: connected although not declared for web1 (least privilege)"
    )


def test_an_open_ipv6_ruleset_fails_that_host_only(fleet: Fleet) -> None:
    facts = recorded()
    open6 = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    facts["db2"] = with_section(facts["db2"], "ip6tables", out=open6)
    report = report_of(fleet, facts)
    assert report.failed_pairs() == set() and not report.ok
    bad = [c for c in report.checks if c.status is Status.FAIL]
    assert [(c.host, c.name) for c in bad] == [("db2", "firewall.v6")]
    assert (
        "3306/tcp (mysql) from 2001:db8:ffff:ffff::1 (not a source) is admitted by INPUT policy ACCEPT"
        in bad[0].cause
    )


def test_mismatched_public_key_fails_both_directions_of_that_pair(fleet: Fleet) -> None:
    facts = recorded()
    keys = facts["web2"].get("peerkeys").out  # type: ignore[union-attr]
    lines = [ln if not ln.startswith("db1.pem ") else "db1.pem " + "0" * 64 for ln in keys.splitlines()]
    facts["web2"] = with_section(facts["web2"], "peerkeys", out="\n".join(lines))
    report = report_of(fleet, facts)
    assert report.failed_pairs() == {("web2", "db1"), ("db1", "web2")}
    cause = report.get("db1", "web2", "ipsec.keys").cause
    assert "web2's public key for db1 (/etc/swanctl/pubkey/db1.pem" in cause and "is not db1's key" in cause


def test_stale_sa_on_one_side_is_detected_by_spi_mismatch(fleet: Fleet) -> None:
    facts = recorded()
    sas = facts["web2"].get("sas").out  # type: ignore[union-attr]
    sas = sas.replace("174bf3d127303ca5", "00000000000000aa")
    facts["web2"] = with_section(facts["web2"], "sas", out=sas)
    report = report_of(fleet, facts)
    assert ("web1", "web2") in report.failed_pairs()
    assert "SPIs differ" in report.get("web1", "web2", "ipsec.ike").cause


def test_unreachable_host_fails_its_pairs_with_one_cause(fleet: Fleet) -> None:
    facts = recorded()
    facts["db1"] = HostFacts("db1", error="host db1 (192.0.2.21:22): connect timed out")
    report = report_of(fleet, facts)
    assert report.failed_pairs() == {p for p in report.pairs if "db1" in p}
    assert [c.name for c in report.for_host("db1")] == ["ssh"] * 4
    assert "cannot read db1" in report.get("web1", "db1", "ipsec.config").cause


def test_kernel_datapath_without_esp_skips_child_sa_and_datapath_with_the_reason(tmp_path: Path) -> None:
    fleet = example_fleet(tmp_path, datapath="kernel")
    facts = recorded()
    esp = Section("kernel_esp", 2, "", "Error: Requested type not found.")
    sad = "Nov 25 17:40:01 13[IKE] <mesh-{peer}|1> unable to install inbound and outbound IPsec SA (SAD) in kernel"
    for h, peer in (("web1", "web2"), ("web2", "web1")):
        f = facts[h]
        # keep the IKE SAs, drop the CHILD_SAs (what charon shows when the kernel refused them)
        sas = "\n".join(_drop_children(f.get("sas").out.splitlines()))  # type: ignore[union-attr]
        sections = dict(f.sections)
        sections["sas"] = replace(sections["sas"], out=sas)
        sections["kernel_esp"] = esp
        sections["log"] = replace(sections["log"], out=sections["log"].out + "\n" + sad.format(peer=peer))
        facts[h] = replace(f, sections=MappingProxyType(sections))
    report = report_of(fleet, facts)
    child = report.get("web1", "web2", "ipsec.child")
    assert child.status is Status.SKIP
    assert child.cause == (
        "child SA not installed: the kernel has no ESP (xfrm state add ... Requested type not found); "
        "use datapath libipsec"
    )
    assert "unable to install inbound and outbound IPsec SA (SAD) in kernel" in child.evidence
    assert report.get("web1", "web2", "ipsec.ike").status is Status.PASS
    assert report.get("web1", "web2", "datapath").status is Status.SKIP
    # the SAD error in the log is the same cause: skipped with it, not a failure
    log = report.get("web1", "web2", "ipsec.log")
    assert log.status is Status.SKIP and log.cause == child.cause and "(SAD) in kernel" in log.evidence
    # the recorded rulesets are libipsec's (-i ipsec0): for a kernel-datapath fleet that is
    # rightly a firewall failure, and the only one
    assert {c.name for c in report.checks if c.status is Status.FAIL} == {"firewall"}


def _drop_children(lines: list[str]) -> list[str]:
    out: list[str] = []
    depth = 0
    for ln in lines:
        if ln.strip() == "child-sas {":
            depth = 1
            out.append(ln)
            continue
        if depth:
            depth += ln.count("{") - ln.count("}")
            if depth == 0:
                out.append(ln)
            continue
        out.append(ln)
    return out


# ---------------------------------------------------------------- parsers


def test_vici_pretty_parser_keeps_values_with_spaces_and_lists() -> None:
    text = (ROOT / "tests/fixtures/verify/mesh4-libipsec.json").read_text()
    conns = ipsec_state.parse_conns(json.loads(text)["web1"]["sections"]["conns"]["out"])
    c = conns["mesh-web2"]
    assert c.local_addrs == ("192.0.2.11",) and c.remote_id == "192.0.2.12"
    assert c.child("mesh-web2-net") == ipsec_state.ChildConf(
        "mesh-web2-net", "TUNNEL", ("10.99.0.11/32",), ("10.99.0.12/32",)
    )
    tree = ipsec_state.parse_vici_pretty(
        "list-conn event {\n  x {\n    class = public key\n    groups = [\n    ]\n  }\n}\n"
    )
    assert tree == [("list-conn event", {"x": {"class": "public key", "groups": []}})]
    with pytest.raises(ipsec_state.ViciParseError):
        ipsec_state.parse_vici_pretty("list-sa event {\n  x {\n    state = ESTABLISHED\n")


def test_charon_log_errors_are_attributed_and_recovery_is_tracked() -> None:
    lines = [
        "Nov 25 17:22:09 00[LIB] plugin 'tpm': failed to load - tpm_plugin_create returned NULL",
        "Nov 25 17:22:09 00[LIB] loaded plugins: charon ... error-notify counters",
        "Nov 25 17:22:11 11[IKE] <1> no IKE config found for 192.0.2.12...192.0.2.11, sending NO_PROPOSAL_CHOSEN",
        "Nov 25 17:22:11 10[IKE] <mesh-web2|1> received NO_PROPOSAL_CHOSEN notify error",
        "Nov 25 17:23:00 10[IKE] <mesh-web2|2> IKE_SA mesh-web2[2] established between 192.0.2.11...192.0.2.12",
        "Nov 25 17:24:00 10[IKE] <mesh-db1|3> received AUTHENTICATION_FAILED notify error",
        "Nov 25 17:24:01 10[CFG] something failed without a connection",
    ]
    read = ipsec_log.analyse_log(lines, addr_to_conn={"192.0.2.11": "mesh-web1", "192.0.2.12": "mesh-web2"})
    assert [(e.connection, e.recovered) for e in read.errors] == [
        ("mesh-web1", False),
        ("mesh-web2", True),
        ("mesh-db1", False),
        (None, False),
    ]
    cursor = ipsec_log.parse_log_section("CURSOR 12 100 400000 137856\n" + "\n".join(lines))
    assert cursor.truncated and cursor.lines_read == len(lines)
    assert not ipsec_log.parse_log_section("NOLOG").present


def test_capture_parser_classifies_esp_in_udp_plain_esp_and_clear_icmp() -> None:
    cap = "\n".join(
        [
            "17:30:01.1 IP 192.0.2.11.4500 > 192.0.2.12.4500: UDP-encap: ESP(spi=0x759150e3,seq=0x1), length 120",
            "17:30:01.2 IP 192.0.2.12.4500 > 192.0.2.11.4500: UDP-encap: ESP(spi=0xfe27424d,seq=0x1), length 120",
            "17:30:01.3 IP 192.0.2.11 > 192.0.2.21: ESP(spi=0x1,seq=0x1), length 100",
            "17:30:01.4 IP 192.0.2.11.4500 > 192.0.2.12.4500: NONESP-encap: isakmp: child_sa  inf2",
            "17:30:01.5 IP 10.99.0.11 > 10.99.0.12: ICMP echo request, id 7, seq 1, length 64",
        ]
    )
    kinds = [p.kind for p in datapath.parse_capture(cap)]
    assert kinds == ["esp-udp", "esp-udp", "esp", "ike", "icmp"]
    t = datapath.pair_traffic(
        datapath.parse_capture(cap),
        own_public="192.0.2.11",
        peer_public="192.0.2.12",
        own_internal="10.99.0.11",
        peer_internal="10.99.0.12",
    )
    assert (t.esp_out, t.esp_in, t.esp_udp, len(t.clear_icmp)) == (1, 1, 2, 1)
    probe = {
        "capture": Section("capture", 0, cap),
        "caperr": Section("caperr", 0, "listening on eth0, link-type EN10MB"),
        "ping:10.99.0.12": Section("ping:10.99.0.12", 0, "3 packets transmitted, 3 received, 0% packet loss"),
    }
    c = datapath.check(
        "web1",
        "web2",
        probe=probe,
        probe_error=None,
        own_public="192.0.2.11",
        peer_public="192.0.2.12",
        own_internal="10.99.0.11",
        peer_internal="10.99.0.12",
        interface="eth0",
    )
    assert c.status is Status.FAIL and "clear-text ICMP between 10.99.0.11 and 10.99.0.12" in c.cause
    assert datapath.parse_ping("3 packets transmitted, 0 received, 100% packet loss").ok is False


def test_apache_headers_and_failures(fleet: Fleet) -> None:
    status, headers = parse_headers(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nServer: Apache\r\n\r\n"
    )
    assert status == "HTTP/1.1 503 Service Unavailable" and headers["server"] == ["Apache"]
    assert sample_path("/shop/*") == "/shop/reconciler-verify"
    facts = recorded()
    out = facts["web1"].get("http:shop-1").out  # type: ignore[union-attr]
    leaky = out.replace("Server: Apache", "Server: Apache/2.4.62 (Debian)\r\nX-Powered-By: Servlet/3.0")
    facts["web1"] = with_section(facts["web1"], "http:shop-1", out=leaky)
    report = report_of(fleet, facts)
    cause = report.get("web1", "", "apache.shop").cause
    assert "not exactly 'Apache'" in cause and "X-Powered-By: Servlet/3.0 is present" in cause
    assert report.failed_pairs() == set() and not report.ok


def test_apparmor_profile_that_does_not_parse_fails(fleet: Fleet) -> None:
    facts = recorded()
    err = "AppArmor parser error for /etc/apparmor.d/usr.sbin.mysqld in profile /etc/apparmor.d/local/usr.sbin.mysqld at line 3: syntax error"
    facts["db1"] = with_section(facts["db1"], "aa:/etc/apparmor.d/usr.sbin.mysqld", rc=1, err=err)
    report = report_of(fleet, facts)
    assert report.get("db1", "", "apparmor.usr.sbin.mysqld").cause.endswith("at line 3: syntax error")


def test_framing_survives_forged_markers_and_cut_off_output() -> None:
    nonce = "0123abcd"
    out = (
        f"\n@@{nonce}<log\n@@ffff<x\n\n@@ffff>log 0\nline\n\n@@{nonce}>log 0\n\n@@{nonce}<sas\npartial"
    ).encode()
    secs = split_sections(out, nonce)
    assert secs["log"].out == "@@ffff<x\n\n@@ffff>log 0\nline" and secs["log"].rc == 0
    assert secs["sas"].rc == -1 and secs["sas"].out == "partial"


async def test_a_log_line_printing_a_frame_marker_cannot_forge_a_section(tmp_path: Path) -> None:
    """The real facts script on a fake host: charon's log (which any process logging through
    charon can fill) holds frame markers of every shape; the sections stay ours."""
    from reconciler.host.fake import FakeHost
    from reconciler.verify.facts import FactsRequest, read_facts

    host = FakeHost(tmp_path)
    forged = "\n@@0000<forged\nx\n\n@@0000>forged 0\n@@<forged\n\n@@>log 0\nRCNV END log 0\n"
    log = host.write("/var/log/charon.log", "real line\n" + forged)
    req = FactsRequest(interface="lo", ipsec=True, log_path=str(log), cursor_path=host.path("/cursor"))
    secs = await read_facts(host, req, timeout=60)
    assert secs["log"].rc == 0 and secs["log"].out.endswith("real line\n" + forged.rstrip("\n"))
    assert "forged" not in secs and {"iptables", "iface", "charon"} <= set(secs)
    argv = host.calls[0]
    assert argv[:2] == ("sh", "-c") and not any(re.fullmatch(r"[0-9a-f]{32}", a) for a in argv)


def test_report_table_json_and_metrics(fleet: Fleet) -> None:
    facts = recorded()
    facts["db2"] = HostFacts("db2", error="timed out after 60 s")
    report = report_of(fleet, facts)
    text = render_text(report)
    assert "db2: 4 failed" in text and "-> db2 (FAILED)" in text and "6/12 pairs ok" in text
    assert "skipped (this machine cannot run them)" in text
    data = json.loads(to_json(report))
    assert data["ok"] is False and data["exit_code"] == 1 and len(data["pairs"]) == 12
    m = report.metrics()
    assert m["reconciler_verify_ok"] == 0 and m["reconciler_verify_pairs_failed"] == 6
    assert m['reconciler_verify_host_failed_checks{host="db2"}'] == 4
    assert m["reconciler_verify_checks_failed"] == report.counts()["fail"]


def test_facts_script_log_cursor_reads_only_new_lines_and_follows_rotation(tmp_path: Path) -> None:
    """The real facts script, run by sh here (ipsec off except the log, which points at a
    scratch file): the cursor file makes the second run see only the appended lines, and a
    rotated log (new inode) is read from its start."""
    from reconciler.host.fake import FakeHost
    from reconciler.verify.facts import FactsRequest, read_facts

    log, cursor = tmp_path / "charon.log", tmp_path / "state" / "cursor"
    log.write_text("line one\nline two failed\n")
    req = FactsRequest(interface="lo", ipsec=True, log_path=str(log), cursor_path=str(cursor))

    def run() -> str:
        return asyncio.run(read_facts(FakeHost(tmp_path), req, timeout=60))["log"].out

    first = run()
    assert first.splitlines()[1:] == ["line one", "line two failed"]
    assert cursor.read_text().split()[1] == str(log.stat().st_size)
    with log.open("a") as f:
        f.write("line three\n")
    assert run().splitlines()[1:] == ["line three"]
    assert run().splitlines()[1:] == []
    log.unlink()
    log.write_text("after rotation\n")
    assert run().splitlines()[1:] == ["after rotation"]
    read = ipsec_log.parse_log_section(first)
    assert read.present and [e.line for e in read.errors] == ["line two failed"]


def test_two_ike_sas_per_side_after_simultaneous_initiation_pick_the_matching_pair(fleet: Fleet) -> None:
    facts = recorded()
    sas = facts["web1"].get("sas").out  # type: ignore[union-attr]
    start = sas.index("list-sa event {\n  mesh-web2 {")
    end = (
        sas.index("list-sa event {", start + 1)
        if "list-sa event {" in sas[start + 1 :]
        else sas.index("list-sas reply")
    )
    other = sas[start:end].replace("174bf3d127303ca5", "1111111111111111").replace("759150e3", "0badbeef")
    facts["web1"] = with_section(facts["web1"], "sas", out=other + sas)  # the other SA listed first
    report = report_of(fleet, facts)
    assert report.get("web1", "web2", "ipsec.ike").status is Status.PASS
    assert report.get("web1", "web2", "ipsec.child").status is Status.PASS


def test_a_retransmit_that_was_answered_is_not_an_error_but_giving_up_is() -> None:
    read = ipsec_log.analyse_log(
        [
            "Nov 25 20:26:33 10[IKE] <mesh-db1|48> retransmit 1 of request with message ID 2",
            "Nov 25 20:26:33 10[ENC] <mesh-db1|48> parsed INFORMATIONAL response 2 [ ]",
        ]
    )
    assert read.errors == ()
    read = ipsec_log.analyse_log(
        [
            "Nov 25 20:26:33 10[IKE] <mesh-db1|48> retransmit 5 of request with message ID 2",
            "Nov 25 20:27:20 10[IKE] <mesh-db1|48> giving up after 5 retransmits",
        ]
    )
    assert [e.connection for e in read.errors] == ["mesh-db1"] and "giving up" in read.errors[0].line


@pytest.mark.parametrize(
    "algorithm", [["-algorithm", "ed25519"], ["-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048"]]
)
def test_peer_key_hashes_match_openssl_for_the_pem_files_the_host_sends(
    tmp_path: Path, algorithm: list[str]
) -> None:
    """The host sends its peers' public key files as they are (`tail -v -n +1`); the hash made
    here must be the one `openssl pkey -pubin -outform DER | sha256sum` makes on a host."""
    import subprocess

    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genpkey", *algorithm, "-out", str(key)], check=True, capture_output=True)
    pub = tmp_path / "web2.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(pub), "-outform", "DER"], check=True,
                         capture_output=True).stdout  # fmt: skip
    (tmp_path / "bad.pem").write_text("not a key\n")
    sent = subprocess.run(["tail", "-v", "-n", "+1", "--", str(pub), str(tmp_path / "bad.pem")], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    import hashlib

    hashes = ipsec_log.parse_key_hashes(sent)
    assert hashes == {"web2.pem": hashlib.sha256(der).hexdigest(), "bad.pem": "unreadable"}
    # facts recorded before this format (one "<file> <hash>" line per key) still read
    assert ipsec_log.parse_key_hashes("web2.pem abc\nbad.pem unreadable\n") == {
        "web2.pem": "abc",
        "bad.pem": "unreadable",
    }


def test_the_firewall_prefilter_gives_the_evaluators_own_verdict() -> None:
    """verify drops rules whose -s/-d cannot match a probe before evaluating it (a 50-host
    ruleset has ~500 rules, checked for 2,450 pairs): the verdict must be the full table's."""
    import random
    from ipaddress import IPv4Address

    from reconciler.netfilter.check import Packet, evaluate
    from reconciler.netfilter.iptables import parse_filter
    from reconciler.verify.firewall import _for_packet, _prepare

    rng = random.Random(7)
    addrs = ["192.0.2.101", "192.0.2.102", "192.0.2.103", "10.99.0.101", "10.99.0.102"]
    nets = [*(a + "/32" for a in addrs), "192.0.2.0/24", "10.99.0.0/24", "0.0.0.0/0", "192.0.2.102"]
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for _ in range(300):
        parts = ["-A", rng.choice(["INPUT", "OUTPUT"])]
        if rng.random() < 0.8:
            parts += (["!"] if rng.random() < 0.15 else []) + ["-s", rng.choice(nets)]
        if rng.random() < 0.5:
            parts += (["!"] if rng.random() < 0.15 else []) + ["-d", rng.choice(nets)]
        parts += rng.choice([["-p", "udp", "-m", "udp", "--dport", "500"], ["-p", "esp"], []])
        parts += ["-j", rng.choice(["ACCEPT", "DROP", "REJECT"])]
        lines.append(" ".join(parts))
    text = "\n".join([*lines, "COMMIT"]) + "\n"
    full, prep = parse_filter(text), _prepare(text)
    for src in addrs:
        for dst in addrs:
            for proto, port in (("udp", 500), ("esp", None), ("tcp", 9)):
                for chain in ("INPUT", "OUTPUT"):
                    pkt = Packet(IPv4Address(src), IPv4Address(dst), proto, port, port)
                    assert evaluate(_for_packet(prep, pkt), chain, pkt) == evaluate(full, chain, pkt)
