"""The connection layer against real OpenSSH sshd on lab hosts, plus fault injection.

Faults: a blackholed host (iptables DROP inside the lab host), an unassigned lab address,
a hung command, a frozen sshd / dropped connection / frozen session (tests/faults/proxy.py in
front of a lab host's sshd), transient refusals, and hundreds of connections (fd/task leaks).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import HostKeyRefused, Transient
from reconciler.host.connection import (
    CommandTimeout,
    ConnectFailed,
    ConnectionLost,
    ConnectionPool,
    SshTarget,
)
from reconciler.lab import VOID_ADDRESS, Lab, LabHostSpec
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.lab]

HOSTS = [LabHostSpec(f"c{i}", f"192.0.2.{30 + i}") for i in range(1, 5)]
UNASSIGNED = VOID_ADDRESS  # routed into the lab bridge, no host there: packets go nowhere


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory(HOSTS)
    yield lab
    lab.down()  # free the machine-wide lab lock for the next module


def host_key(lab: Lab, address: str) -> str:
    for line in lab.info.known_hosts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and address in parts[0].split(","):
            return f"{parts[1]} {parts[2]}"
    raise AssertionError(f"no key for {address} in the lab's known_hosts")


def targets(lab: Lab, known_hosts: Path | None = None) -> dict[str, SshTarget]:
    kh = str(known_hosts or lab.info.known_hosts)
    return {
        h.name: SshTarget(
            host=h.name, address=h.address, known_hosts=kh, client_keys=(str(lab.info.client_key),)
        )
        for h in lab.info.hosts
    }


def user_known_hosts_digest() -> str:
    p = Path("~/.ssh/known_hosts").expanduser()
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


async def test_connects_to_every_lab_host_with_strict_keys(lab: Lab) -> None:
    async with ConnectionPool(targets(lab)) as pool:
        results = await asyncio.gather(*(_hostname(pool, h.name) for h in lab.info.hosts))
    assert results == [h.name for h in lab.info.hosts]


async def _hostname(pool: ConnectionPool, host: str) -> str:
    conn = await pool.get(host)
    return (await conn.run(["hostname"])).stdout.decode().strip()


async def test_changed_host_key_is_refused_naming_the_host_and_never_recorded(
    lab: Lab, tmp_path: Path
) -> None:
    c1, c2 = lab.info.hosts[0], lab.info.hosts[1]
    lines = lab.info.known_hosts.read_text().splitlines()
    forged = [
        f"{line.split()[0]} {host_key(lab, c2.address)}" if c1.address in line.split()[0].split(",") else line
        for line in lines
    ]
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(forged) + "\n")
    before = (kh.read_bytes(), user_known_hosts_digest())
    async with ConnectionPool(targets(lab, kh), retries=3, backoff_base=0.01) as pool:
        results = await asyncio.gather(
            *(_hostname(pool, h.name) for h in lab.info.hosts), return_exceptions=True
        )
    assert isinstance(results[0], HostKeyRefused), results[0]
    assert "c1" in str(results[0]) and c1.address in str(results[0])
    assert results[1:] == [h.name for h in lab.info.hosts[1:]]  # the others are unaffected
    assert (kh.read_bytes(), user_known_hosts_digest()) == before  # the key was written nowhere


async def test_unknown_or_wrongly_keyed_host_is_refused(lab: Lab, tmp_path: Path) -> None:
    """On real lab hosts. That the first two are refused before any TCP connection (and the
    third after exactly one) is counted in tests/unit/test_host_keys.py."""
    c1, c2 = lab.info.hosts[0], lab.info.hosts[1]
    empty = tmp_path / "known_hosts"
    empty.write_text(f"{c2.address} {host_key(lab, c2.address)}\n")
    fleet_keys_only = SshTarget(host="c1", address=c1.address, host_keys=(host_key(lab, c2.address),))
    for target in (
        SshTarget(
            host="c1", address=c1.address, known_hosts=str(empty), client_keys=(str(lab.info.client_key),)
        ),
        SshTarget(host="c1", address=c1.address),  # nothing known at all
        fleet_keys_only,  # the fleet lists another host's key
    ):
        async with ConnectionPool({"c1": target}) as pool:
            with pytest.raises(HostKeyRefused, match="c1"):
                await pool.get("c1")


async def test_blackholed_and_unassigned_hosts_time_out_alone(lab: Lab) -> None:
    c3 = lab.info.hosts[2]
    rule = ["iptables", "-I", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"]
    assert lab.exec(c3.name, rule).returncode == 0  # inside the lab host's own netns
    try:
        tg = targets(lab)
        tg["ghost"] = SshTarget(
            host="ghost",
            address=UNASSIGNED,
            host_keys=(host_key(lab, c3.address),),
            client_keys=(str(lab.info.client_key),),
        )
        started = time.monotonic()
        async with ConnectionPool(tg, connect_timeout=2, retries=0) as pool:
            results = await asyncio.gather(*(_hostname(pool, n) for n in tg), return_exceptions=True)
        elapsed = time.monotonic() - started
    finally:
        lab.exec(c3.name, ["iptables", "-D", *rule[2:]])
    by_name = dict(zip(tg, results, strict=True))
    assert isinstance(by_name["c3"], ConnectFailed) and "c3" in str(by_name["c3"])
    assert isinstance(by_name["ghost"], ConnectFailed)
    assert [by_name[h.name] for h in lab.info.hosts if h.name != "c3"] == ["c1", "c2", "c4"]
    assert elapsed < 6, elapsed  # bounded by connect_timeout, not the kernel's TCP timeout


async def test_hung_command_fails_alone_and_is_killed_on_the_host(lab: Lab) -> None:
    async with ConnectionPool(targets(lab)) as pool:
        c1, c2 = await pool.get("c1"), await pool.get("c2")
        started = time.monotonic()
        hung, fine = await asyncio.gather(
            c1.run(["sh", "-c", "sleep 300 & sleep 301"], timeout=1),
            c2.run(["sh", "-c", "sleep 0.5; echo ok"], timeout=10),
            return_exceptions=True,
        )
        assert isinstance(hung, CommandTimeout) and "c1" in str(hung)
        assert time.monotonic() - started < 5
        assert not isinstance(fine, BaseException) and fine.stdout == b"ok\n"
        left = lab.exec("c1", ["sh", "-c", "ps -eo comm,args | grep -c '^sleep *sleep 30[01]' || true"])
        assert left.stdout.strip() == b"0"  # the whole process group is gone
        assert (await c1.run(["echo", "still usable"])).stdout == b"still usable\n"


def _proxy_target(lab: Lab, proxy: FaultProxy, *, key_of: str | None = None) -> dict[str, SshTarget]:
    c4 = lab.info.hosts[3]
    key = host_key(lab, key_of or c4.address)
    return {
        "c4": SshTarget(
            host="c4",
            address="127.0.0.1",
            port=proxy.port,
            host_keys=(key,),
            client_keys=(str(lab.info.client_key),),
        )
    }


async def _proxy(lab: Lab, **kw: Any) -> FaultProxy:
    return await FaultProxy(upstream=(lab.info.hosts[3].address, 22), **kw).start()


async def test_frozen_sshd_times_out_and_is_retried_as_transient(lab: Lab) -> None:
    proxy = await _proxy(lab, mode="blackhole")
    try:
        started = time.monotonic()
        async with ConnectionPool(
            _proxy_target(lab, proxy), connect_timeout=1, retries=1, backoff_base=0.01
        ) as pool:
            with pytest.raises(ConnectFailed, match="c4"):
                await pool.get("c4")
        assert time.monotonic() - started < 4
        assert proxy.accepted == 2  # one retry
    finally:
        await proxy.stop()


async def test_transient_refusals_are_retried_then_succeed(lab: Lab) -> None:
    proxy = await _proxy(lab, refuse_first=2)
    try:
        async with ConnectionPool(_proxy_target(lab, proxy), retries=2, backoff_base=0.01) as pool:
            assert (await (await pool.get("c4")).run(["hostname"])).stdout == b"c4\n"
        assert proxy.accepted == 3
    finally:
        await proxy.stop()


async def test_host_key_refusal_is_never_retried(lab: Lab) -> None:
    proxy = await _proxy(lab)
    try:
        tg = _proxy_target(lab, proxy, key_of=lab.info.hosts[0].address)
        async with ConnectionPool(tg, retries=3, backoff_base=0.01) as pool:
            with pytest.raises(HostKeyRefused, match="c4"):
                await pool.get("c4")
        assert proxy.accepted == 1
    finally:
        await proxy.stop()


async def test_connection_dropped_mid_transfer_is_transient_and_next_get_reconnects(lab: Lab) -> None:
    proxy = await _proxy(lab)
    try:
        async with ConnectionPool(_proxy_target(lab, proxy), retries=0) as pool:
            conn = await pool.get("c4")
            proxy.limit = proxy.server_bytes + 100_000
            proxy.mode = "drop_after"
            with pytest.raises(Transient, match="c4"):
                await conn.run(["sh", "-c", "head -c 3000000 /dev/zero | base64"], timeout=20)
            proxy.mode = "pass"
            again = await pool.get("c4")
            assert again is not conn
            assert (await again.run(["hostname"])).stdout == b"c4\n"
    finally:
        await proxy.stop()


async def test_frozen_session_is_detected_by_keepalive(lab: Lab) -> None:
    proxy = await _proxy(lab)
    try:
        async with ConnectionPool(
            _proxy_target(lab, proxy), keepalive_interval=0.5, keepalive_count_max=2, retries=0
        ) as pool:
            conn = await pool.get("c4")
            proxy.limit = proxy.server_bytes
            proxy.mode = "freeze_after"
            started = time.monotonic()
            with pytest.raises((ConnectionLost, CommandTimeout)):
                await conn.run(["sleep", "20"], timeout=30)
            assert time.monotonic() - started < 8  # keepalive, not the 30 s command timeout
    finally:
        await proxy.stop()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_hundreds_of_connections_leak_no_fd_or_task(lab: Lab) -> None:
    tg = targets(lab)
    names = [h.name for h in lab.info.hosts]
    async with ConnectionPool(tg) as warm:  # import/first-use costs outside the measurement
        await (await warm.get(names[0])).run(["true"])
    fds, tasks = _fds(), len(asyncio.all_tasks())

    async def one(i: int, pool: ConnectionPool) -> int:
        conn = await pool.fresh(names[i % len(names)])
        try:
            return (await conn.run(["true"])).exit_status
        finally:
            await conn.close()

    async with ConnectionPool(tg, max_concurrency=24, retries=3, backoff_base=0.05) as pool:
        statuses = await asyncio.gather(*(one(i, pool) for i in range(200)))
        peak = _fds()
    assert statuses == [0] * 200
    await asyncio.sleep(0.2)
    assert _fds() <= fds + 2, (fds, peak, _fds())
    assert len(asyncio.all_tasks()) <= tasks


SUDO_SETUP = """set -e
for u in deploy nosudo; do
  useradd -m -s /bin/sh "$u"
  usermod -p '*' "$u"  # no password, but not locked (sshd refuses locked accounts)
  mkdir -p "/home/$u/.ssh"
  cp /root/.ssh/authorized_keys "/home/$u/.ssh/"
  chown -R "$u:" "/home/$u/.ssh"
done
echo 'deploy ALL=(root) NOPASSWD: ALL' > /etc/sudoers.d/deploy
chmod 440 /etc/sudoers.d/deploy
"""


async def test_non_root_user_runs_through_sudo_n(lab: Lab) -> None:
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed on this machine (scripts/install.sh installs it)")
    c2 = lab.info.hosts[1]
    setup = lab.exec(c2.name, ["sh", "-c", SUDO_SETUP])
    assert setup.returncode == 0, setup.stderr
    base = targets(lab)["c2"]
    for user in ("deploy", "nosudo"):
        target = SshTarget(
            host="c2",
            address=c2.address,
            user=user,
            known_hosts=base.known_hosts,
            client_keys=base.client_keys,
        )
        async with ConnectionPool({"c2": target}) as pool:
            conn = await pool.get("c2")
            res = await conn.run(["id", "-u"])
            script = await conn.run_script('id -u; printf "%s" "$1"', args=["a b; id"])
        if user == "deploy":
            assert (res.exit_status, res.stdout) == (0, b"0\n")
            assert script.stdout == b"0\na b; id"
        else:  # sudo -n never prompts: it fails at once
            assert res.exit_status == 1 and b"password is required" in res.stderr
