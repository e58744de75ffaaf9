"""Faults during apply on real lab hosts: a ruleset that cuts management SSH is rolled back by
the host itself (IPv4 and IPv6 both); a persistent rules file that cannot be written (read-only
/etc/iptables) is a reported failure, not success; the SSH connection killed mid-apply leaves
no half-written file and the next apply converges; a reload failure restores the old files."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.engine.apply import apply_host
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.errors import Reason
from reconciler.host.connection import ConnectionPool, SshTarget
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.resources import Desired, Domain, FileResource, FirewallRuleset, Handler, Validator
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

WINDOW = 4.0

GOOD = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""
# management_sources without 192.0.2.254: render would refuse it, so the Desired is hand-made
CUTS_SSH = GOOD.replace("192.0.2.254/32", "198.51.100.0/24")
GOOD6 = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""
# the IPv6 half of the change that cuts SSH: it must be rolled back with the IPv4 half
OTHER6 = GOOD6.replace(
    "-A INPUT -i lo -j ACCEPT\n", "-A INPUT -i lo -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT\n"
)


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory([LabHostSpec("f1", "192.0.2.41"), LabHostSpec("f2", "192.0.2.42")], lock_timeout=3000)
    yield lab
    lab.down()


def pool_for(lab: Lab, **kw: Any) -> ConnectionPool:
    targets = {
        h.name: SshTarget(
            host=h.name,
            address=h.address,
            known_hosts=str(lab.info.known_hosts),
            client_keys=(str(lab.info.client_key),),
        )
        for h in lab.info.hosts
    }
    return ConnectionPool(targets, connect_timeout=kw.pop("connect_timeout", 3.0), **kw)


def sh(lab: Lab, host: str, script: str) -> str:
    res = lab.exec(host, ["sh", "-c", script])
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


async def converge(pool: ConnectionPool, host: str, desired: Desired) -> Any:
    observed = await observe_host(await pool.get(host), desired)
    plan = plan_host(desired, observed)
    return plan, await apply_host(pool, host, plan, desired, firewall_window=WINDOW)


async def test_ruleset_cutting_management_ssh_is_rolled_back_by_the_host(lab: Lab) -> None:
    good = Desired(host="f1", firewall=FirewallRuleset(GOOD, rules_v6=GOOD6))
    bad = Desired(host="f1", firewall=FirewallRuleset(CUTS_SSH, rules_v6=OTHER6))
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", good)
        assert result.ok and result.converged, result.messages
        assert any("confirmed over a new SSH connection" in m for m in result.messages)
    live_good = sh(lab, "f1", "iptables-save | grep -- '^-A'")
    live_good6 = sh(lab, "f1", "ip6tables-save | grep -- '^-A'")
    persistent_good = sh(lab, "f1", "cat /etc/iptables/rules.v4")
    assert "192.0.2.254/32" in live_good and persistent_good == GOOD
    assert "--icmpv6-type 135" in live_good6 and "--dport 80" not in live_good6
    assert sh(lab, "f1", "cat /etc/iptables/rules.v6") == GOOD6

    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", bad)
    assert [a.kind for a in plan.actions] == [ActionKind.RESTORE_FIREWALL]
    assert not result.ok and result.rolled_back
    assert any("firewall change rolled back: management SSH was cut" in m for m in result.messages), (
        result.messages
    )
    # the host restored the old rules by itself, IPv4 and IPv6 (the IPv6 half had loaded: it
    # is rolled back too); the persistent files were never written
    assert sh(lab, "f1", "iptables-save | grep -- '^-A'") == live_good
    assert sh(lab, "f1", "ip6tables-save | grep -- '^-A'") == live_good6
    assert sh(lab, "f1", "cat /etc/iptables/rules.v4") == persistent_good
    assert sh(lab, "f1", "cat /etc/iptables/rules.v6") == GOOD6
    # and management SSH works again
    async with pool_for(lab) as pool:
        res = await (await pool.get("f1")).run(["true"])
        assert res.exit_status == 0


async def test_persistent_file_that_cannot_be_written_is_a_failure_with_its_cause(lab: Lab) -> None:
    # /etc/iptables read-only (a bind mount inside the host): the live rules load and are
    # confirmed, then writing rules.v4/rules.v6 fails; that is a failed action, not success
    ro = "mkdir -p /etc/iptables && mount --bind /etc/iptables /etc/iptables"
    ro += " && mount -o remount,bind,ro /etc/iptables"
    assert lab.exec("f2", ["sh", "-c", ro]).returncode == 0
    before = sh(lab, "f2", "cat /etc/iptables/rules.v4 2>&1")
    desired = Desired(host="f2", firewall=FirewallRuleset(GOOD, rules_v6=GOOD6))
    try:
        async with pool_for(lab) as pool:
            plan, result = await converge(pool, "f2", desired)
    finally:
        lab.exec("f2", ["umount", "/etc/iptables"])
    assert [a.kind for a in plan.actions] == [ActionKind.RESTORE_FIREWALL]
    assert not result.ok and not result.rolled_back and result.changed() == 0
    fw = result.outcomes[0]
    assert fw.status == "failed", fw
    assert "applied and confirmed over a new SSH connection, but the persistent file" in fw.message
    assert "/etc/iptables/rules.v4 /etc/iptables/rules.v6 could not be written" in fw.message
    assert "Read-only file system" in fw.message
    # typed for the daemon: an apply failure with this cause (retried: the next apply writes it)
    assert result.failure is not None and result.failure.reason is Reason.APPLY_FAILED
    assert "Read-only file system" in result.failure.message
    # the live rules are the new ones (confirmed, kept); the old file is untouched
    assert "-A INPUT -s 192.0.2.254/32 -p tcp -m tcp --dport 22 -j ACCEPT" in sh(lab, "f2", "iptables-save")
    assert "--icmpv6-type 135" in sh(lab, "f2", "ip6tables-save")
    assert sh(lab, "f2", "cat /etc/iptables/rules.v4 2>&1") == before
    assert sh(lab, "f2", "ls -a /etc/iptables | grep reconciler || true").strip() == ""
    # with /etc writable again, the next apply writes the files and converges
    async with pool_for(lab) as pool:
        plan2, result2 = await converge(pool, "f2", desired)
        assert result2.ok and result2.converged, result2.messages
    assert sh(lab, "f2", "cat /etc/iptables/rules.v6") == GOOD6


def kill_ssh_sessions(lab: Lab, host: str) -> None:
    # the sshd session processes inside the lab host (not PID 1, the listener)
    lab.exec(host, ["sh", "-c", "for p in $(pgrep -f 'sshd: root'); do kill -9 $p; done"])


async def test_ssh_killed_mid_apply_leaves_no_half_written_file(lab: Lab) -> None:
    big = bytes(range(256)) * (48 * 1024 * 1024 // 256)  # 48 MiB
    old = b"old content\n"
    lab.exec("f2", ["sh", "-c", "mkdir -p /etc/rbig && printf 'old content\\n' > /etc/rbig/big.bin"])
    desired = Desired(
        host="f2",
        files=(
            FileResource("/etc/rbig/big.bin", big, Domain.FILES),
            FileResource("/etc/rbig/small.conf", b"small\n", Domain.FILES),
        ),
    )
    async with pool_for(lab) as pool:
        observed = await observe_host(await pool.get("f2"), desired)
        plan = plan_host(desired, observed)
        task = asyncio.create_task(apply_host(pool, "f2", plan, desired))
        for _ in range(400):  # kill as soon as the staged temp appears (mid-transfer, usually)
            await asyncio.sleep(0.01)
            if ".big.bin.reconciler-" in sh(lab, "f2", "ls -a /etc/rbig"):
                break
        kill_ssh_sessions(lab, "f2")
        result = await task
    assert not result.ok
    assert any("connection lost" in m or "stopped" in m for m in result.messages), result.messages
    live = lab.exec("f2", ["cat", "/etc/rbig/big.bin"]).stdout
    assert live in (old, big), f"half-written live file: {len(live)} bytes"
    assert "small.conf" not in sh(lab, "f2", "ls /etc/rbig") or live == big

    async with pool_for(lab) as pool:
        plan2, result2 = await converge(pool, "f2", desired)
        assert result2.ok and result2.converged, result2.messages
    assert (
        hashlib.sha256(lab.exec("f2", ["cat", "/etc/rbig/big.bin"]).stdout).digest()
        == hashlib.sha256(big).digest()
    )
    assert sh(lab, "f2", "ls -a /etc/rbig | grep reconciler || true").strip() == ""


async def test_reload_failure_restores_old_files_and_reloads_again(lab: Lab) -> None:
    # the handler's reload fails while the flag file exists; the validator passes
    lab.exec(
        "f1", ["sh", "-c", "mkdir -p /etc/rsvc && printf 'v1\\n' > /etc/rsvc/app.conf && rm -f /tmp/fail"]
    )
    reload_script = (
        "if [ -e /tmp/fail ]; then echo boom >&2; exit 1; fi; cat /etc/rsvc/app.conf >> /tmp/reloads"
    )
    handler = Handler(
        name="rsvc",
        validators=(Validator(argv=("grep", "-rq", "v", "{tree}"), tree_root="/etc/rsvc"),),
        reload=("sh", "-c", reload_script),
    )
    conf = FileResource(
        "/etc/rsvc/app.conf",
        b"v2\n",
        Domain.FILES,
        handler="rsvc",
        validators=(Validator(argv=("grep", "-q", "^v", "{path}")),),
    )
    desired = Desired(
        host="f1",
        files=(conf,),
        handlers=(handler,),
        firewall=FirewallRuleset(GOOD, rules_v6=GOOD6),  # as in the first test: in sync, not pruned
    )
    lab.exec("f1", ["touch", "/tmp/fail"])
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", desired)
    # (the firewall is already in sync when the first test ran before; run alone, it converges too)
    kinds = [a.kind for a in plan.actions if a.kind is not ActionKind.RESTORE_FIREWALL]
    assert kinds == [ActionKind.UPDATE, ActionKind.RELOAD]
    assert not result.ok
    assert any("reload of rsvc failed" in m and "restored" in m for m in result.messages), result.messages
    assert sh(lab, "f1", "cat /etc/rsvc/app.conf") == "v1\n"
    assert sh(lab, "f1", "ls -a /etc/rsvc | grep reconciler || true").strip() == ""
    lab.exec("f1", ["rm", "-f", "/tmp/fail"])
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", desired)
        assert result.ok and result.converged and result.reloaded == ("rsvc",), result.messages
        plan3 = plan_host(desired, await observe_host(await pool.get("f1"), desired))
    assert sh(lab, "f1", "cat /etc/rsvc/app.conf") == "v2\n"
    assert sh(lab, "f1", "cat /tmp/reloads") == "v2\n"
    # second apply: zero changes (only the inventory, already recorded)
    assert plan3.actions == ()
