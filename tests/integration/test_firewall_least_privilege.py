"""The least-privilege mesh firewall and IPv6 filtering, live on lab hosts.

A 3-host lab (web1, db1, db2) converged from fleet-repo-example with the mesh in mode tunnel +
datapath libipsec (the datapath this kernel runs) and one change: web1's port 80 is declared
for host db1 only (the example opens it to anyone). Then, with REAL TCP connects from the
hosts' own namespaces over the mesh (bash's /dev/tcp, from the source host's internal address
through its IPsec SA):

- db1 reaches Apache on web1:80 over the mesh, db2 does not (dropped), and neither reaches
  web1's sshd over the mesh; web1 reaches db1:3306 (declared for role web: the kernel answers
  with a reset, nothing listens), db2 does not;
- `reconciler verify` passes its least-privilege checks (the evaluator's declared/undeclared
  probes, firewall.reach with its own real connects, firewall.v6), and fails, naming the
  cause, once someone opens web1 to db2 by hand;
- rules.v6 is live in every host's netfilter (ip6tables-save equals the rendered rules) and a
  v6 connect to web1's Apache is dropped unless declared (db1 yes, db2 no), with positive
  evidence first (db2's ping6 to web1 answers: neighbour discovery works through the rules);
- `mesh.trust: all` opens web1:80 to db2 over the mesh again.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.render import render_hosts
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.kinds.firewall import iptables_text
from reconciler.lab import Lab, specs_from_fleet
from reconciler.netfilter.iptables import canonical_iptables
from reconciler.verify import Status

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from services_fleets import MYSQLD_PROFILE  # noqa: E402
from test_verify_mesh import _apply, converge, establish, verify  # noqa: E402

WEB1, DB1, DB2 = "10.99.0.11", "10.99.0.21", "10.99.0.22"
WEB1_V6 = "2001:db8::11"


def make_repo(tmp: Path, *, trust: str = "least") -> Path:
    repo = tmp / "fleet"
    if not repo.exists():
        shutil.copytree(ROOT / "fleet-repo-example", repo)
        (repo / "hosts" / "web2.yaml").unlink()
        text = (repo / "fleet.yaml").read_text()
        text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
        (repo / "fleet.yaml").write_text(text)
        web = (repo / "roles" / "web.yaml").read_text()
        web = web.replace("{name: http, port: 80, protocol: tcp}", "{name: http, port: 80, sources: [db1]}")
        (repo / "roles" / "web.yaml").write_text(web)
    lines = [ln for ln in (repo / "fleet.yaml").read_text().splitlines() if not ln.startswith("  trust:")]
    at = lines.index("  topology: full") + 1
    (repo / "fleet.yaml").write_text("\n".join([*lines[:at], f"  trust: {trust}", *lines[at:]]) + "\n")
    return repo


@pytest.fixture(scope="module")
def mesh(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Lab, Path]]:
    repo = make_repo(tmp_path_factory.mktemp("least-privilege"))
    fleet = load_fleet(repo)
    lab = lab_factory(specs_from_fleet(fleet))
    for h in ("db1", "db2"):  # the packaged profile the fleet's local override extends
        put = lab.exec(
            h, ["sh", "-c", "cat > /etc/apparmor.d/usr.sbin.mysqld"], input=MYSQLD_PROFILE.encode()
        )
        assert put.returncode == 0, put.stderr
    fleet = converge(repo, lab)
    establish(fleet, lab)
    yield fleet, lab, repo
    lab.down()


def connect(lab: Lab, host: str, address: str, port: int, timeout: float = 3.0) -> str:
    """A real TCP connect from inside ``host``: "open", "refused" or "dropped" (no answer)."""
    res = lab.exec(
        host,
        ["timeout", str(timeout), "bash", "-c", ': <>"/dev/tcp/$0/$1"', address, str(port)],
        timeout=timeout + 10,
    )
    if res.returncode == 0:
        return "open"
    if res.returncode == 124:
        return "dropped"
    err = res.stderr.decode(errors="replace")
    return "refused" if "refused" in err else f"error: {err.strip()}"


def pings(lab: Lab, host: str, address: str) -> bool:
    argv = ["ping", "-n", "-c", "2", "-W", "2", "-i", "0.2", address]
    if ":" not in address:
        argv[1:1] = ["-I", {"web1": WEB1, "db1": DB1, "db2": DB2}[host]]
    return lab.exec(host, argv, timeout=20).returncode == 0


def wait_listening(lab: Lab, host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.exec(host, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout.decode()
        if any(
            f":{port:04X} " in ln and ln.split()[3] == "0A"
            for ln in out.splitlines()[1:]
            if len(ln.split()) > 3
        ):
            return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {host}:{port}")


def test_only_the_declared_peer_reaches_a_port_over_the_mesh(mesh: tuple[Fleet, Lab, Path]) -> None:
    fleet, lab, _ = mesh
    wait_listening(lab, "web1", 80)  # Apache, started by the apply
    # positive evidence first: the mesh path from both db hosts to web1 works
    assert pings(lab, "db1", WEB1) and pings(lab, "db2", WEB1)
    assert connect(lab, "db1", WEB1, 80) == "open"  # declared: sources [db1]
    assert connect(lab, "db2", WEB1, 80) == "dropped"  # a linked peer, not declared
    # sshd listens on every host: no peer reaches it over the mesh (management only)
    assert connect(lab, "db1", WEB1, 22) == "dropped"
    # MySQL is declared for role web: web1 gets through (nothing listens: the kernel resets),
    # the other db host does not
    assert connect(lab, "web1", DB1, 3306) == "refused"
    assert connect(lab, "db2", DB1, 3306) == "dropped"
    # the port is open to anyone on the public address (443 has no sources)
    assert connect(lab, "db2", "192.0.2.11", 443) in ("open", "refused")


def test_verify_proves_least_privilege_with_real_connects(mesh: tuple[Fleet, Lab, Path]) -> None:
    fleet, lab, _ = mesh
    report = verify(fleet, lab)
    failed = [(c.host, c.peer, c.name, c.cause) for c in report.checks if c.status is Status.FAIL]
    assert not failed, failed
    reach = report.get("web1", "db1", "firewall.reach")
    assert reach.status is Status.PASS, reach
    assert "web1:80 (80/tcp (http)) from db1: connected (declared)" in reach.evidence
    assert "web1:22 (22/tcp (management SSH)) from db1: dropped (not declared)" in reach.evidence
    other = report.get("web1", "db2", "firewall.reach")
    assert other.status is Status.PASS and "web1:80 (80/tcp (http)) from db2: dropped" in other.evidence
    fw = report.get("web1", "db2", "firewall")
    assert fw.status is Status.PASS and "80/tcp (http) (not declared)" in fw.evidence
    for h in fleet.host_names():
        v6 = report.get(h, "", "firewall.v6")
        assert v6.status is Status.PASS, v6


def test_verify_fails_when_a_port_is_opened_to_an_undeclared_peer(mesh: tuple[Fleet, Lab, Path]) -> None:
    fleet, lab, _ = mesh
    rule = [
        "iptables",
        "-I",
        "INPUT",
        "1",
        "-s",
        DB2,
        "-i",
        "ipsec0",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "ACCEPT",
    ]
    assert lab.exec("web1", rule).returncode == 0
    try:
        report = verify(fleet, lab)
        fw = report.get("web1", "db2", "firewall")
        assert fw.status is Status.FAIL and "(least privilege)" in fw.cause, fw
        reach = report.get("web1", "db2", "firewall.reach")
        assert reach.status is Status.FAIL, reach
        assert "web1:80 (80/tcp (http)) from db2: connected although not declared for db2" in reach.cause
        assert report.get("web1", "db1", "firewall.reach").status is Status.PASS
    finally:
        asyncio.run(_apply(fleet, lab))  # the engine puts the declared ruleset back
    assert connect(lab, "db2", WEB1, 80) == "dropped"


def test_rules_v6_are_live_and_filter_ipv6(mesh: tuple[Fleet, Lab, Path]) -> None:
    fleet, lab, _ = mesh
    desired = render_hosts(fleet, fleet.host_names())
    for h in fleet.host_names():
        fw = desired[h].firewall
        assert fw is not None and fw.rules_v6 is not None
        live = lab.exec(h, ["ip6tables-save", "-t", "filter"]).stdout.decode()
        assert iptables_text(canonical_iptables(live)) == iptables_text(canonical_iptables(fw.rules_v6)), h
        persisted = lab.exec(h, ["cat", "/etc/iptables/rules.v6"]).stdout.decode()
        assert persisted == fw.rules_v6
    wait_listening(lab, "web1", 80)
    # positive evidence: IPv6 works between the hosts through the rules (ND, echo)
    assert pings(lab, "db2", WEB1_V6) and pings(lab, "db1", WEB1_V6)
    assert connect(lab, "db1", WEB1_V6, 80) == "open"  # db1 is a declared source (its v6 address)
    assert connect(lab, "db2", WEB1_V6, 80) == "dropped"
    assert connect(lab, "db2", WEB1_V6, 22) == "dropped"  # no IPv6 management source declared
    # 443 is open to anyone: over IPv6 too
    assert connect(lab, "db2", WEB1_V6, 443) in ("open", "refused")


def test_mesh_trust_all_opens_every_port_to_every_peer(mesh: tuple[Fleet, Lab, Path]) -> None:
    fleet, lab, repo = mesh
    make_repo(repo.parent, trust="all")
    trusted = load_fleet(repo)
    assert trusted.mesh.trust.value == "all"
    asyncio.run(_apply(trusted, lab))
    assert pings(lab, "db2", WEB1)
    assert connect(lab, "db2", WEB1, 80) == "open"
    assert connect(lab, "db2", DB1, 3306) == "refused"  # reaches db1's kernel: admitted
    report = verify(trusted, lab)
    failed = [(c.host, c.peer, c.name, c.cause) for c in report.checks if c.status is Status.FAIL]
    assert not failed, failed
    assert "any port (mesh.trust: all)" in report.get("web1", "db2", "firewall").evidence
