"""The use-case layer (reconciler/usecases.py): the drift use case's history push, on real git
repos (a file:// remote, an unreachable https remote, a remote named like an option)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from snapshot_local import LocalRunner, git

from reconciler import usecases
from reconciler.drift.history import HistoryError, HistoryRepo, commit_subject
from reconciler.drift.snapshot import PathPolicy, take_snapshot
from reconciler.gitrepo import init_bare


async def _record(repo: HistoryRepo, root: Path) -> str | None:
    runner = LocalRunner()
    prev = await repo.recorded(runner.host)
    policy = PathPolicy(roots=(str(root),))
    snap = await take_snapshot(runner, policy, lambda p: prev[p].sha256 if p in prev else None)
    prep = await repo.prepare(snap, prev)
    info = await repo.commit(prep, commit_subject(prep.changes, (str(root),)))
    return info.sha if info is not None else None


async def test_history_push_coalesces_and_reports_failures(tmp_path: Path) -> None:
    root = tmp_path / "etc"
    root.mkdir()
    (root / "motd").write_text("a\n")
    remote = tmp_path / "remote.git"
    init_bare(remote, initial_branch="main")
    events: list[str] = []
    drift = usecases.Drift.open(tmp_path / "state", remote=f"file://{remote}", on_push_error=events.append)
    head = await _record(drift.history, root)
    errors = await asyncio.gather(*(drift.push() for _ in range(6)))
    assert errors == [None] * 6
    assert 1 <= drift.push.pushes <= 2  # six requests, coalesced
    assert git(remote, "rev-parse", "refs/heads/main").strip() == head
    # a remote that does not answer: an event and an error, never an exception
    drift.history.remote = "https://deploy:s3cret-token@127.0.0.1:9/history.git"
    error = await drift.push()
    assert error is not None and "s3cret-token" not in error and "***@127.0.0.1" in error
    assert events == [error]


async def test_history_remote_cannot_be_an_option(tmp_path: Path) -> None:
    """A remote that looks like an option is passed after ``--``: git treats it as a repository
    name (and fails); nothing runs."""
    root = tmp_path / "etc"
    root.mkdir()
    (root / "motd").write_text("a\n")
    marker = tmp_path / "pwned"
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state", remote=f"--receive-pack=touch {marker}")
    await _record(repo, root)
    with pytest.raises(HistoryError):
        await repo.push()
    assert not marker.exists()


async def test_the_daemon_pushes_only_after_a_recorded_commit_or_a_failed_push(tmp_path: Path) -> None:
    from reconciler.drift.scan import HostDrift

    remote = tmp_path / "remote.git"
    init_bare(remote, initial_branch="main")
    drift = usecases.Drift.open(tmp_path / "state", remote=f"file://{remote}")
    root = tmp_path / "etc"
    root.mkdir()
    (root / "motd").write_text("a\n")
    head = await _record(drift.history, root)
    assert await usecases._push(drift, [HostDrift("local")], False) == (None, False)  # a no-op scan
    assert drift.push.pushes == 0
    assert await usecases._push(drift, [HostDrift("local", commit=head)], False) == (None, True)
    assert drift.push.pushes == 1 and git(remote, "rev-parse", "refs/heads/main").strip() == head
    drift.history.remote = str(tmp_path / "gone.git")  # fails: the next no-op scan tries again
    error, pushed = await usecases._push(drift, [HostDrift("local", commit=head)], False)
    assert error is not None and not pushed
    drift.history.remote = f"file://{remote}"
    assert await usecases._push(drift, [HostDrift("local")], False) == (None, True)
