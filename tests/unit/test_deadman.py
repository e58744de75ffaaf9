"""The firewall dead-man switch (engine/deadman.py) without a lab: its real arm/apply/confirm
scripts run with the real iptables in private network namespaces (``unshare --net``), the
"host" of each test. The pool is a fault-injecting fake: once the new rules are loaded the
cached connection proves nothing (it may have been cut, or survive only through conntrack), so
it refuses every later command; a NEW connection succeeds only when the LIVE rules of the
namespace admit a new TCP session to port 22 (a real SYN to a real listener, through netfilter).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from reconciler.engine import deadman
from reconciler.host.connection import CommandResult, ConnectFailed, ConnectionLost
from reconciler.host.script import run_framed, said
from reconciler.kinds.resources import FirewallRuleset

OLD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
      "-A INPUT -p tcp -m tcp --dport 7001 -j ACCEPT\nCOMMIT\n"  # fmt: skip
GOOD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
       "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n" \
       "-A INPUT -p tcp -m tcp --dport 7002 -j DROP\nCOMMIT\n"  # fmt: skip
CUTS_SSH = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
           "-A INPUT -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n"  # fmt: skip

# A new "SSH session": a listener on 127.0.0.1:22 in the namespace and a SYN to it through netfilter.
SSH_PROBE = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 22)); srv.listen()
c = socket.socket(); c.settimeout(0.7)
try:
    c.connect(("127.0.0.1", 22))
except OSError:
    sys.exit(1)
"""


class NetnsHost:
    """A private network namespace (held by a sleeping ``unshare --net``) and a state dir
    standing for /var/lib/reconciler/firewall."""

    def __init__(self, base: Path) -> None:
        self.state = base / "firewall"
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"])
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(self.netns) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net did not make a namespace")
            time.sleep(0.01)
        self.sh("ip link set lo up")
        self.load(OLD)

    def argv(self, script: str, args: Sequence[str] = ()) -> list[str]:
        return ["nsenter", f"--net={self.netns}", "--", "sh", "-c", script, "sh", *args]

    def sh(self, script: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(script), input=stdin, capture_output=True, check=True, timeout=30)

    def load(self, rules: str) -> None:
        self.sh("iptables-restore", rules.encode())

    def live(self) -> str:
        return self.sh("iptables-save").stdout.decode()

    def ssh_admitted(self) -> bool:
        probe = ["nsenter", f"--net={self.netns}", "--", "python3", "-c", SSH_PROBE]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

    def others(self) -> list[int]:
        """PIDs in the namespace other than its holder (the armed rollback, for one)."""
        ns = os.readlink(self.netns)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == ns:
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    def close(self) -> None:
        for pid in self.others():  # only processes in OUR namespace: a left rollback
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.holder.kill()
        self.holder.wait(timeout=10)


class NsConn:
    def __init__(self, host: NetnsHost, pool: NsPool, label: str) -> None:
        self.host, self.pool, self.label = host, pool, label
        self.closed = False

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        raise AssertionError("the dead-man switch runs scripts only")

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        if self.closed:
            raise ConnectionLost(f"{self.label}: closed")
        if self.label == "cached" and self.pool.rules_changed:
            raise ConnectionLost("the cached connection predates the new rules: it proves nothing")
        self.pool.ran.append((self.label, script))
        proc = await asyncio.create_subprocess_exec(
            *self.host.argv(script.replace(deadman.STATE_DIR, str(self.host.state)), args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin_after or b""), timeout or 30)
        if script is deadman.ARM_AND_APPLY:
            self.pool.rules_changed = True
        return CommandResult(int(proc.returncode or 0), out, err)

    async def close(self) -> None:
        self.closed = True


class NsPool:
    def __init__(self, host: NetnsHost) -> None:
        self.host = host
        self.rules_changed = False
        self.ran: list[tuple[str, str]] = []
        self.cached = NsConn(host, self, "cached")
        self.opened = 0

    async def get(self, name: str) -> NsConn:
        return self.cached

    async def fresh(self, name: str) -> NsConn:
        if not await asyncio.to_thread(self.host.ssh_admitted):
            raise ConnectFailed(f"host {name}: connect timed out (the live rules drop SSH)")
        self.opened += 1
        return NsConn(self.host, self, f"fresh{self.opened}")


def _needs() -> None:
    missing = [t for t in ("unshare", "nsenter", "iptables-restore", "iptables-save") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and {', '.join(missing) or 'the tools'} (private network namespaces)")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[NetnsHost]:
    _needs()
    h = NetnsHost(tmp_path)
    try:
        yield h
    finally:
        h.close()


def ruleset(rules: str, tmp_path: Path) -> FirewallRuleset:
    return FirewallRuleset(rules_v4=rules, persistent_path=str(tmp_path / "etc" / "rules.v4"))


async def test_good_rules_are_confirmed_over_a_new_connection_and_the_rollback_is_disarmed(
    host: NetnsHost, tmp_path: Path
) -> None:
    pool = NsPool(host)
    out = await deadman.apply_firewall(pool, "h1", ruleset(GOOD, tmp_path), token="t1", window=8)  # type: ignore[arg-type]
    assert out.ok and out.live_confirmed and not out.rolled_back, out
    assert [(label, s is deadman.CONFIRM) for label, s in pool.ran] == [("cached", False), ("fresh1", True)]
    assert "--dport 7002 -j DROP" in host.live() and "7001" not in host.live()
    assert (tmp_path / "etc" / "rules.v4").read_text() == GOOD
    assert host.others() == []  # the armed rollback was killed: it can never fire later
    left = [p.name for p in host.state.iterdir()]
    assert not [n for n in left if n.startswith("armed.t1")], left  # nothing armed, nothing fired


async def test_rules_that_cut_ssh_are_rolled_back_by_the_host_itself(host: NetnsHost, tmp_path: Path) -> None:
    pool = NsPool(host)
    started = time.monotonic()
    out = await deadman.apply_firewall(pool, "h1", ruleset(CUTS_SSH, tmp_path), token="t2", window=2)  # type: ignore[arg-type]
    assert not out.ok and out.rolled_back, out
    assert "old rules restored by the host" in out.message, out.message
    assert time.monotonic() - started >= 2  # the host waited out its window
    assert "--dport 7001 -j ACCEPT" in host.live() and "--dport 22 -j DROP" not in host.live()
    assert host.ssh_admitted()
    assert not (tmp_path / "etc" / "rules.v4").exists()  # never persisted
    assert all(s is not deadman.CONFIRM for _, s in pool.ran)


async def test_confirm_and_rollback_never_both_win(tmp_path: Path) -> None:
    """Confirmation sent at instants around the end of a 5 s window (the first at once, the
    last well after it): in each namespace exactly one of (confirmed, rolled back) happens, and
    the live rules match the winner."""
    _needs()
    delays = (0.0, 4.6, 4.8, 4.9, 5.0, 5.1, 5.2, 7.5)  # a loaded CI machine is slow
    hosts = [NetnsHost(tmp_path / f"h{i}") for i in range(len(delays))]
    try:

        async def trial(h: NetnsHost, delay: float) -> tuple[bool, bool]:
            pool = NsPool(h)
            armed = await run_framed(
                pool.cached,
                deadman.ARM_AND_APPLY,
                ("tr", "5", str(len(GOOD)), "0"),
                stdin_after=GOOD.encode(),
            )
            assert armed.result.exit_status == 0, armed
            await asyncio.sleep(delay)
            conn = await pool.fresh("h")
            res = await run_framed(conn, deadman.CONFIRM, ("tr", str(tmp_path / f"p{delay}"), ""))
            await asyncio.sleep(2.0)  # the rollback, if it is still armed, has fired by now
            confirmed = "live-confirmed" in said(res.sections)
            fired = (h.state / "armed.tr.fired").exists()
            live = h.live()
            assert ("7002" in live) == confirmed and ("7001" in live) == fired, (delay, res, live)
            assert h.others() == []
            return confirmed, fired

        results = await asyncio.gather(*(trial(h, d) for h, d in zip(hosts, delays, strict=True)))
    finally:
        for h in hosts:
            h.close()
    assert all(c != f for c, f in results), results  # exactly one winner, every time
    assert results[0] == (True, False) and results[-1] == (False, True)  # both outcomes were seen
