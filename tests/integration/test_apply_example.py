"""The example fleet applied to its lab: converge, collect keys, converge again, second apply is a
no-op, plan mutates nothing, a broken Apache site is refused, a changed host key is refused, an
unreachable host times out while the others converge. Real sshd, iptables, charon, apache2."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.keys import collect
from reconciler.domains.render import render_host
from reconciler.engine.apply import apply_host
from reconciler.engine.fleet import (
    APPLIED,
    CHANGES,
    ERROR,
    IN_SYNC,
    CommandRecord,
    RecordingConnection,
    apply_planned,
    plan_fleet,
    reconcile_fleet,
)
from reconciler.engine.observe import PRELUDE, observe_host
from reconciler.engine.plan import plan_host
from reconciler.fleet.load import load_fleet
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.lab import VOID_ADDRESS, Lab, specs_from_fleet

pytestmark = [pytest.mark.lab, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
WINDOW = 4.0  # firewall dead-man window for tests


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fleet") / "repo"
    shutil.copytree(EXAMPLE, dest)
    return dest


@pytest.fixture(scope="module")
def lab(lab_factory: Any, repo: Path) -> Iterator[Lab]:
    lab = lab_factory(specs_from_fleet(load_fleet(repo)), lock_timeout=3000)
    yield lab
    lab.down()  # free the machine-wide lab lock for the next module


def pool_for(lab: Lab, fleet: Any, **kw: Any) -> ConnectionPool:
    info = lab.info
    override = {h.name: h.address for h in info.hosts}
    override.update(kw.pop("override", {}))
    targets = targets_for(
        fleet,
        known_hosts=kw.pop("known_hosts", str(info.known_hosts)),
        client_keys=[str(info.client_key)],
        address_override=override,
    )
    return ConnectionPool(targets, **kw)


def sh(lab: Lab, host: str, script: str) -> str:
    res = lab.exec(host, ["sh", "-c", script])
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


STATE = (
    "find /etc /var/lib/reconciler /srv -xdev \\( -type f -o -type l \\) "
    "-printf '%p %m %u %g %T@ %s %l\\n' 2>/dev/null | sort; "
    "iptables-save | grep -v '^#'; ip -o link; ip -o addr; "
    # the processes on the host, less this snapshot's own pipeline: a child forked for `sort`
    # shows as `sh` until it execs, which made two snapshots of an idle host differ
    "ps -eo pid=,ppid=,comm= | awk -v me=$$ '$1 != me && $2 != me {print $3}' | sort"
)


async def test_plan_runs_no_mutating_command(lab: Lab, repo: Path) -> None:
    fleet = load_fleet(repo)
    before = {h.name: sh(lab, h.name, STATE) for h in fleet.hosts}
    async with pool_for(lab, fleet) as pool:
        result = await plan_fleet(fleet, None, pool)
    assert all(o.status != ERROR for o in result.hosts), [o.error for o in result.hosts]
    assert result.exit_code() == 2  # changes pending on a fresh lab
    # every command plan ran is an observation script (read-only by construction) ...
    assert result.commands
    for rec in result.commands:
        assert rec.kind == "script" and rec.text.startswith(PRELUDE), rec.text[:200]
        assert rec.stdin_bytes == 33  # only the framing nonce (32 hex digits + newline)
    per_host = {h.name: sum(1 for r in result.commands if r.host == h.name) for h in fleet.hosts}
    assert all(1 <= n <= 2 for n in per_host.values()), per_host
    # ... and the hosts are byte-for-byte as before (files, mtimes, netfilter, links, processes)
    after = {h.name: sh(lab, h.name, STATE) for h in fleet.hosts}
    assert after == before


async def test_example_fleet_converges(lab: Lab, repo: Path) -> None:
    fleet = load_fleet(repo)
    async with pool_for(lab, fleet) as pool:
        first = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=WINDOW)
        for o in first.hosts:
            assert o.status == APPLIED, (o.host, o.error, o.result and o.result.messages)
            assert o.result is not None and o.result.converged
        # the hosts made their key pairs; collect the public keys into the repo
        collected = await collect(fleet, [], pool, repo)
        assert all(ok for _, _, ok in collected), collected
    assert sorted(p.name for p in (repo / "keys").glob("*.pub")) == [f"{h.name}.pub" for h in fleet.hosts]
    for p in (repo / "keys").glob("*.pub"):
        assert b"PRIVATE" not in p.read_bytes()

    fleet = load_fleet(repo)  # now with every peer's key: IPsec connections render
    async with pool_for(lab, fleet) as pool:
        second = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=WINDOW)
        for o in second.hosts:
            assert o.status in (APPLIED, IN_SYNC), (o.host, o.error, o.result and o.result.messages)
        assert all(not o.plan.pending for o in second.hosts if o.plan), "no peer key should be pending"

        # a second apply on the same commit: zero changes, zero reloads
        again = await plan_fleet(fleet, None, pool)
        assert [o.status for o in again.hosts] == [IN_SYNC] * len(fleet.hosts), [
            (o.host, [(a.kind, a.resource, a.reason) for a in o.plan.actions] if o.plan else o.error)
            for o in again.hosts
        ]
        applied = await apply_planned(again, pool)
        assert all(o.result is None for o in applied.hosts)  # nothing ran
        assert applied.exit_code() == 0

    for h in fleet.hosts:
        rules = sh(lab, h.name, "iptables-save")
        assert "-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT" in rules
        assert "--pol ipsec" in rules
        persistent = sh(lab, h.name, "cat /etc/iptables/rules.v4")
        assert "COMMIT" in persistent
        conns = sh(lab, h.name, "swanctl --list-conns 2>/dev/null")
        for peer in fleet.peers_of(h):
            assert peer.name in conns, (h.name, conns)
        motd = sh(lab, h.name, "cat /etc/motd")
        assert f"{h.name} (" in motd
        inv = sh(lab, h.name, "cat /var/lib/reconciler/inventory.json")
        assert "/etc/motd" in inv
        temps = sh(lab, h.name, "find /etc -name '.*.reconciler-*' 2>/dev/null")
        assert temps.strip() == "", temps
        kernel_ipip = sh(lab, h.name, "ip link add rcltest type ipip 2>&1; ip link del rcltest 2>&1")
        links = sh(lab, h.name, "ip -o link")
        plan = next(o.plan for o in again.hosts if o.host == h.name)
        assert plan is not None
        if "Unknown device type" in kernel_ipip or "No such device" in kernel_ipip:
            assert plan.skipped and all("ipip" in s.reason for s in plan.skipped)
        else:
            assert all(f"ipip-{p.name}" in links for p in fleet.peers_of(h))

    for web in (h for h in fleet.hosts if "web" in h.roles):
        head = subprocess.run(
            [
                "curl",
                "-sS",
                "-m",
                "5",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
                "Host: shop.example.com",
                f"http://{web.public_address}/shop/style.css",
            ],
            capture_output=True,
            check=False,
            timeout=10,
        ).stdout.decode()
        assert "Server: Apache\r\n" in head, head
        assert "X-Powered-By" not in head, head


class RecordingPool:
    """The pool, with every command it runs recorded (engine.RecordingConnection)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.records: list[CommandRecord] = []

    async def get(self, host: str) -> Any:
        return RecordingConnection(await self.pool.get(host), self.records)


async def test_a_file_only_change_is_proven_in_the_same_round_trip(
    lab: Lab, repo: Path, tmp_path: Path
) -> None:
    """A plan that only writes declared files (no handler, inventory unchanged) takes two round
    trips: the observation, then one run of the path-safety helper that stages, swaps and reads
    the written files back (kind, mode, owner, sha256 after the renames): the apply's proof that
    the host converged, without reading iptables, swanctl or services again."""
    changed = tmp_path / "repo"
    shutil.copytree(repo, changed)
    motd = changed / "templates" / "motd.j2"
    motd.write_text(motd.read_text() + "Narrow re-observation test.\n")
    fleet = load_fleet(changed)
    async with pool_for(lab, fleet) as real:
        pool = RecordingPool(real)
        result = await reconcile_fleet(
            fleet, ["web1"], pool, apply=True, firewall_window=WINDOW, fetch_diffs=False
        )
        out = result.hosts[0]
        assert out.status == APPLIED and out.result is not None and out.result.converged, out
        assert out.plan is not None
        assert [a.kind for a in out.plan.actions] == ["update"], out.plan.actions
        assert [r.kind for r in pool.records] == ["script", "run"], [r.text[:80] for r in pool.records]
        observation, change = (r.text for r in pool.records)
        assert observation.startswith(PRELUDE) and "iptables-save" in observation.split(PRELUDE, 1)[1]
        assert change.startswith("perl -e ") and change.endswith(" -- stdin")  # stage, swap, read back
        assert "sub op_stage" in change and "sub op_swap" in change and "sha256sum" in change
        assert "iptables-save" not in change and "--list-sas" not in change
        assert out.result.verify is not None and not out.result.verify.actions
        assert "Narrow re-observation test." in sh(lab, "web1", "cat /etc/motd")
        # the read-back agrees with a full observation: nothing left to do
        again = await plan_fleet(fleet, ["web1"], real)
        assert again.hosts[0].status == IN_SYNC, again.hosts[0].plan
        # a hand edit right after is seen by the next full observation as usual
        sh(lab, "web1", "echo tampered >> /etc/motd")
        drifted = await plan_fleet(fleet, ["web1"], real)
        assert drifted.hosts[0].status == CHANGES
        # put the module's fleet back on web1 for the tests that follow
        back = await reconcile_fleet(load_fleet(repo), ["web1"], real, apply=True, firewall_window=WINDOW)
        assert back.hosts[0].status == APPLIED


async def test_broken_apache_site_is_refused_and_old_site_keeps_serving(lab: Lab, repo: Path) -> None:
    fleet = load_fleet(repo)
    web = next(h for h in fleet.hosts if "web" in h.roles)
    desired = render_host(fleet, web)
    site = next(f for f in desired.files if f.path.startswith("/etc/apache2/sites-available/"))
    broken = dataclasses.replace(site, content=site.content + b"\nThisIsNotADirective on\n")
    desired = dataclasses.replace(desired, files=tuple(broken if f is site else f for f in desired.files))
    live_before = sh(lab, web.name, f"sha256sum {site.path}; cat /var/run/apache2/apache2.pid")
    async with pool_for(lab, fleet) as pool:
        observed = await observe_host(await pool.get(web.name), desired)
        plan = plan_host(desired, observed)
        assert [a.kind for a in plan.actions] == ["update", "reload"]
        assert "+ThisIsNotADirective on" in plan.actions[0].diff
        result = await apply_host(pool, web.name, plan, desired)
    assert not result.ok
    assert result.reloaded == ()
    text = "\n".join(result.messages)
    assert "validation failed" in text and "ThisIsNotADirective" in text, text
    assert sh(lab, web.name, f"sha256sum {site.path}; cat /var/run/apache2/apache2.pid") == live_before
    assert sh(lab, web.name, "find /etc/apache2 -name '.*.reconciler-*'").strip() == ""
    head = subprocess.run(
        [
            "curl",
            "-sS",
            "-m",
            "5",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Host: shop.example.com",
            f"http://{web.public_address}/",
        ],
        capture_output=True,
        check=False,
        timeout=10,
    ).stdout.decode()
    assert "Server: Apache" in head


async def test_changed_host_key_is_refused_others_still_planned(lab: Lab, repo: Path, tmp_path: Path) -> None:
    fleet = load_fleet(repo)
    a, b = fleet.hosts[0], fleet.hosts[1]
    lines = lab.info.known_hosts.read_text().splitlines()
    key_of = {
        ln.split()[0]: " ".join(ln.split()[1:]) for ln in lines if ln.strip() and not ln.startswith("#")
    }
    # b's address now "presents" a's key: b's real key is a changed/unknown key
    swapped = [ln for ln in lines if not ln.startswith(str(b.public_address) + " ")]
    swapped.append(f"{b.public_address} {key_of[str(a.public_address)]}")
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(swapped) + "\n")
    async with pool_for(lab, fleet, known_hosts=str(kh)) as pool:
        result = await plan_fleet(fleet, None, pool)
    by = {o.host: o for o in result.hosts}
    assert by[b.name].status == ERROR and "host key" in (by[b.name].error or ""), by[b.name].error
    assert all(o.status == IN_SYNC for n, o in by.items() if n != b.name)
    assert result.exit_code() == 1
    assert kh.read_text().count(str(b.public_address)) == 1  # nothing was recorded


async def test_unreachable_host_times_out_while_others_converge(lab: Lab, repo: Path) -> None:
    fleet = load_fleet(repo)
    gone = fleet.hosts[-1]
    # drift one file on every other host, so they have something to converge
    for h in fleet.hosts[:-1]:
        lab.exec(h.name, ["sh", "-c", "echo drift >> /etc/motd"])
    # the lab's void address: routed into the lab bridge, nobody there -> connect times out
    async with pool_for(lab, fleet, override={gone.name: VOID_ADDRESS}, connect_timeout=2.0) as pool:
        pool.retries = 0
        result = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=WINDOW)
    by = {o.host: o for o in result.hosts}
    assert by[gone.name].status == ERROR and VOID_ADDRESS in (by[gone.name].error or "")
    for h in fleet.hosts[:-1]:
        assert by[h.name].status == APPLIED, (h.name, by[h.name].error)
        assert "drift" not in sh(lab, h.name, "cat /etc/motd")
    assert result.exit_code() == 1
