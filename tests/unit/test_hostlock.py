"""The apply's host lock (engine/hostlock.py) on a real flock, through LocalConnection."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from reconciler.engine import hostlock
from reconciler.host.connection import ConnectionPool, SshTarget


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run-reconciler"
    monkeypatch.setattr(hostlock, "LOCK_DIR", str(d))
    monkeypatch.setattr(hostlock, "LOCK_FILE", str(d / "apply.lock"))
    return d


def pool() -> ConnectionPool:
    return ConnectionPool({"me": SshTarget(host="me", address="127.0.0.1", local=True)})


def test_a_second_apply_is_refused_while_the_first_holds_the_lock(lock_dir: Path) -> None:
    async def main() -> None:
        async with pool() as p:
            conn = await p.get("me")
            async with hostlock.host_lock(conn, "me"):
                assert (lock_dir.stat().st_mode & 0o777) == 0o700
                with pytest.raises(hostlock.HostLocked, match="another apply holds"):
                    async with hostlock.host_lock(await p.get("me"), "me"):
                        raise AssertionError("entered a held lock")
            async with hostlock.host_lock(conn, "me"):  # released at the end of the block
                pass

    asyncio.run(main())


def test_the_lock_goes_with_the_holder_process(lock_dir: Path) -> None:
    """A holder that dies (a crashed reconciler's session) leaves no stale lock."""

    async def main() -> None:
        async with pool() as p:
            conn = await p.get("me")
            with pytest.raises(RuntimeError):
                async with hostlock.host_lock(conn, "me"):
                    raise RuntimeError("apply crashed")
            async with hostlock.host_lock(conn, "me"):
                pass

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_a_planted_link_or_foreign_directory_is_refused(lock_dir: Path, tmp_path: Path) -> None:
    async def attempt() -> None:
        async with pool() as p, hostlock.host_lock(await p.get("me"), "me"):
            pass

    lock_dir.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("keep\n")
    (lock_dir / "apply.lock").symlink_to(target)
    with pytest.raises(hostlock.Terminal, match="is a link"):
        asyncio.run(attempt())
    (lock_dir / "apply.lock").unlink()
    os.chown(lock_dir, 65534, 65534)
    with pytest.raises(hostlock.Terminal, match="not root's"):
        asyncio.run(attempt())
    assert target.read_text() == "keep\n"
