"""Faults during apply on real lab hosts: a ruleset that cuts management SSH is rolled back by
the host itself; the SSH connection killed mid-apply leaves no half-written file and the next
apply converges; a reload failure restores the old files."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.apply import apply_host
from reconciler.connection import ConnectionPool, SshTarget
from reconciler.lab import Lab, LabHostSpec
from reconciler.observe import observe_host
from reconciler.plan import ActionKind, plan_host
from reconciler.resources import Desired, Domain, FileResource, FirewallRuleset, Handler, Validator

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
    good = Desired(host="f1", firewall=FirewallRuleset(GOOD))
    bad = Desired(host="f1", firewall=FirewallRuleset(CUTS_SSH))
    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", good)
        assert result.ok and result.converged, result.messages
        assert any("confirmed over a new SSH connection" in m for m in result.messages)
    live_good = sh(lab, "f1", "iptables-save | grep -- '^-A'")
    persistent_good = sh(lab, "f1", "cat /etc/iptables/rules.v4")
    assert "192.0.2.254/32" in live_good and persistent_good == GOOD

    async with pool_for(lab) as pool:
        plan, result = await converge(pool, "f1", bad)
    assert [a.kind for a in plan.actions] == [ActionKind.RESTORE_FIREWALL]
    assert not result.ok and result.rolled_back
    assert any("firewall change rolled back: management SSH was cut" in m for m in result.messages), (
        result.messages
    )
    # the host restored the old rules by itself; the persistent file was never written
    assert sh(lab, "f1", "iptables-save | grep -- '^-A'") == live_good
    assert sh(lab, "f1", "cat /etc/iptables/rules.v4") == persistent_good
    # and management SSH works again
    async with pool_for(lab) as pool:
        res = await (await pool.get("f1")).run(["true"])
        assert res.exit_status == 0


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
        firewall=FirewallRuleset(GOOD),  # as in the first test: in sync, not pruned
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
