"""Strict host keys against a real OpenSSH sshd on loopback (tests/faults/sshd.py), with a
counting TCP proxy in front of it: a host with no trusted key is refused BEFORE any packet (zero
connections reach the proxy), a host presenting another host's key is refused at the handshake
(one connection, no retry), and a known_hosts file alone is enough to trust a host."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from reconciler.errors import HostKeyRefused
from reconciler.host.connection import ConnectionPool, SshTarget, known_hosts_for
from tests.faults import sshd as loopback
from tests.faults.proxy import FaultProxy


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[loopback.LoopbackSshd]:
    why = loopback.available()
    if why:
        pytest.skip(f"loopback sshd: {why}")
    s = loopback.LoopbackSshd.start(tmp_path_factory.mktemp("sshd"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def other_host_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    key = tmp_path_factory.mktemp("other") / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


@pytest.fixture
async def proxy(server: loopback.LoopbackSshd) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(("127.0.0.1", server.port)).start()
    try:
        yield p
    finally:
        await p.stop()


def target(server: loopback.LoopbackSshd, proxy: FaultProxy, **kw: object) -> SshTarget:
    return SshTarget(
        host="h1", address="127.0.0.1", port=proxy.port, client_keys=(str(server.client_key),), **kw
    )  # type: ignore[arg-type]


async def connect_and_run(t: SshTarget) -> int:
    async with ConnectionPool({"h1": t}, connect_timeout=10, retries=2, backoff_base=0.05) as pool:
        conn = await pool.get("h1")
        return (await conn.run(["true"])).exit_status


async def test_no_trusted_key_is_refused_before_any_connection(
    server: loopback.LoopbackSshd, proxy: FaultProxy
) -> None:
    t = target(server, proxy)
    with pytest.raises(HostKeyRefused, match="no trusted host key"):
        known_hosts_for(t)
    with pytest.raises(HostKeyRefused, match="no trusted host key"):
        await connect_and_run(t)
    assert proxy.accepted == 0  # not one TCP connection: nothing to trust on first use


async def test_a_known_hosts_file_without_this_host_is_refused_before_any_connection(
    server: loopback.LoopbackSshd, proxy: FaultProxy, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {server.host_pub}\n")  # the sshd, not this address:port
    t = target(server, proxy, known_hosts=str(known))
    with pytest.raises(HostKeyRefused, match="no trusted host key"):
        await connect_and_run(t)
    assert proxy.accepted == 0


async def test_another_hosts_key_is_refused_at_the_handshake_without_retry(
    server: loopback.LoopbackSshd, proxy: FaultProxy, other_host_key: str
) -> None:
    t = target(server, proxy, host_keys=(other_host_key,))
    with pytest.raises(HostKeyRefused, match="host key refused"):
        await connect_and_run(t)
    assert proxy.accepted == 1  # one attempt: a wrong key is terminal, never retried


async def test_the_right_key_from_the_fleet_or_from_known_hosts_alone_connects(
    server: loopback.LoopbackSshd, proxy: FaultProxy, other_host_key: str, tmp_path: Path
) -> None:
    assert await connect_and_run(target(server, proxy, host_keys=(other_host_key, server.host_pub))) == 0
    assert proxy.accepted == 1
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{proxy.port} {server.host_pub}\n")
    assert await connect_and_run(target(server, proxy, known_hosts=str(known))) == 0
    assert proxy.accepted == 2
