"""LocalConnection: the machine the reconciler runs on, with the Connection interface."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from reconciler.host.connection import CommandTimeout, ConnectionPool, LocalConnection, SshTarget


def _running(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


async def test_local_runs_argv_without_a_shell_and_passes_stdin() -> None:
    async with ConnectionPool({"me": SshTarget(host="me", address="", local=True)}) as pool:
        conn = await pool.get("me")
        assert isinstance(conn, LocalConnection)
        res = await conn.run(["printf", "%s|", "a b", "$(id)"])
        assert (res.exit_status, res.stdout) == (0, b"a b|$(id)|")
        res = await conn.run_script('printf "%s:" "$1"; cat', args=["x; y"], stdin_after=b"IN")
        assert res.stdout == b"x; y:IN"
        assert (await conn.run(["sh", "-c", "exit 7"])).exit_status == 7
        assert (await conn.run(["/nonexistent/tool"])).exit_status == 127


async def test_local_timeout_kills_the_whole_process_group() -> None:
    if os.geteuid() != 0:
        pytest.skip("runs as root in CI; sudo -n would be needed otherwise")
    marker = "317.25"  # an unusual sleep length identifies our processes
    async with ConnectionPool({"me": SshTarget(host="me", address="", local=True)}) as pool:
        conn = await pool.get("me")
        with pytest.raises(CommandTimeout, match="me"):
            await conn.run(["sh", "-c", f"sleep {marker} & sleep {marker}"], timeout=0.5)
    await asyncio.sleep(0.2)
    assert _running(f"sleep\0{marker}") == []


async def test_time_scale_stretches_the_engines_per_command_timeouts_for_slow_hosts() -> None:
    """A per-command timeout sized for a normal host (0.3 s here) times out a 0.9 s command;
    on a pool for slow hosts (time_scale 5: emulated VMs) the same call completes."""
    target = {"me": SshTarget(host="me", address="", local=True)}
    async with ConnectionPool(target) as pool:
        conn = await pool.get("me")
        with pytest.raises(CommandTimeout):
            await conn.run(["sleep", "0.9"], timeout=0.3)
    async with ConnectionPool(target, time_scale=5) as pool:
        conn = await pool.get("me")
        assert (await conn.run(["sleep", "0.9"], timeout=0.3)).exit_status == 0
    with pytest.raises(ValueError):
        ConnectionPool(target, time_scale=0.5)
