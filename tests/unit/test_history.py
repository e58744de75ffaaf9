"""History repo: real git, real manifest script and tar run locally (no SSH) on a temp tree."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest
from snapshot_local import LocalRunner, git

from reconciler.drift.history import HistoryError, HistoryRepo, commit_subject
from reconciler.drift.snapshot import PathPolicy, Snapshot, is_builtin_secret, take_snapshot

CANARY = "CANARY-s3cr3t-7f1d"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "etc"
    (root / "ssl" / "private").mkdir(parents=True)
    (root / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "motd").write_text("hello\n")
    (root / "shadow").write_text(f"root:{CANARY}:19000:0:99999:7:::\n")
    os.chmod(root / "shadow", 0o640)
    (root / "ssl" / "private" / "site.key").write_text(f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n")
    os.symlink("/usr/share/zoneinfo/UTC", root / "localtime")
    (root / "ignored.cache").write_text("x\n")
    (root / "empty").write_text("")
    return root


async def record(
    repo: HistoryRepo, runner: LocalRunner, policy: PathPolicy, msg: str = ""
) -> tuple[Snapshot, object]:
    prev = await repo.recorded(runner.host)
    snap = await take_snapshot(runner, policy, lambda p: prev[p].sha256 if p in prev else None)
    prep = await repo.prepare(snap, prev)
    info = await repo.commit(prep, msg or commit_subject(prep.changes, policy.roots))
    return snap, (prep, info)


def policy_for(root: Path) -> PathPolicy:
    return PathPolicy(roots=(str(root),), exclude=("*.cache",), secret_globs=(f"{root}/shadow",))


async def test_first_snapshot_then_incremental_diff(tmp_path: Path, tree: Path) -> None:
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    assert stat.S_IMODE((tmp_path / "hist").stat().st_mode) == 0o700
    runner = LocalRunner()
    policy = policy_for(tree)
    snap, (prep, info) = await record(repo, runner, policy)
    assert info is not None
    assert len(runner.calls) == 2  # manifest + one tar stream
    assert snap.fetched == 3  # hosts, motd, empty: never the secrets
    assert f"{tree}/ignored.cache" not in prep.meta  # type: ignore[attr-defined]
    files = git(repo.path, "ls-tree", "-r", "--name-only", "main")
    assert f"hosts/local{tree}/hosts" in files and "meta/local.json" in files
    meta = git(repo.path, "show", "main:meta/local.json")
    assert '"mode": "0640"' in meta and '"owner": "' in meta
    assert git(repo.path, "cat-file", "-p", f"main:hosts/local{tree}/localtime") == "/usr/share/zoneinfo/UTC"

    # nothing changed: no fetch, no commit
    runner.calls.clear()
    snap, (prep, info) = await record(repo, runner, policy)
    assert info is None and snap.fetched == 0 and len(runner.calls) == 1

    # one edit, one new file, one removed file, a secret change, a mode change
    (tree / "hosts").write_text("127.0.0.1 localhost\n192.0.2.7 db\n")
    (tree / "new.conf").write_text("new\n")
    (tree / "motd").unlink()
    (tree / "shadow").write_text(f"root:{CANARY}-2:19000:0:99999:7:::\n")
    os.chmod(tree / "ssl" / "private", 0o750)
    os.chmod(tree / "empty", 0o755)  # mode only: same blob, git mode 100755
    snap, (prep, info) = await record(repo, runner, policy)
    assert snap.fetched == 2  # hosts + new.conf only
    ch = prep.changes  # type: ignore[attr-defined]
    assert ch.new == (f"{tree}/new.conf",)
    assert ch.removed == (f"{tree}/motd",)
    assert set(ch.changed) == {f"{tree}/hosts", f"{tree}/shadow", f"{tree}/ssl/private", f"{tree}/empty"}
    assert ch.secret_changed == (f"{tree}/shadow",)
    assert commit_subject(ch, policy.roots) == f"local: 4 changed, 1 new, 1 removed in {tree}"
    assert git(repo.path, "ls-tree", "main", f"hosts/local{tree}/empty").startswith("100755 blob e69de29")
    diff = await repo.diff(info.sha, "local")  # type: ignore[attr-defined]
    assert "+192.0.2.7 db" in diff and "+new" in diff and "-hello" in diff
    assert "shadow" not in diff and CANARY not in diff
    assert git(repo.path, "log", "-1", "--format=%an <%ae>") == "reconciler <reconciler@localhost>\n"

    # the secret never reached git, in any commit, in any form
    everything = git(repo.path, "log", "-p", "--all")
    assert CANARY not in everything
    assert "hmac-sha256:" in everything
    objects = subprocess.run(
        ["git", f"--git-dir={repo.path}", "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True,
        check=True,
    ).stdout
    assert CANARY.encode() not in objects

    # recovery helpers: commits of a host, changes rebuilt from git alone
    commits = await repo.host_commits("local")
    assert len(commits) == 2 and commits[-1] == info.sha  # type: ignore[attr-defined]
    rebuilt = await repo.changes_in(info.sha, "local")  # type: ignore[attr-defined]
    assert rebuilt == ch


async def test_stale_lock_is_loud(tmp_path: Path, tree: Path) -> None:
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    runner = LocalRunner()
    await record(repo, runner, policy_for(tree))
    (tree / "hosts").write_text("changed\n")
    (repo.path / "index.lock").write_text("")
    with pytest.raises(HistoryError, match="stale lock"):
        await record(repo, runner, policy_for(tree))
    (repo.path / "index.lock").unlink()
    (repo.path / "refs" / "heads" / "main.lock").write_text("")
    with pytest.raises(HistoryError):
        await record(repo, runner, policy_for(tree))
    (repo.path / "refs" / "heads" / "main.lock").unlink()
    _, (_, info) = await record(repo, runner, policy_for(tree))
    assert info is not None


async def test_commit_is_idempotent_by_tree(tmp_path: Path, tree: Path) -> None:
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    runner = LocalRunner()
    await record(repo, runner, policy_for(tree))
    (tree / "hosts").write_text("changed\n")
    prev = await repo.recorded("local")
    snap = await take_snapshot(runner, policy_for(tree), lambda p: prev[p].sha256 if p in prev else None)
    prep = await repo.prepare(snap, prev)
    first = await repo.commit(prep, "x")
    assert first is not None
    # the same prepared state again (a scan restarted after its commit): no second commit
    prep2 = await repo.prepare(snap, await repo.recorded("local"))
    assert await repo.commit(prep2, "x") is None
    assert len(await repo.host_commits("local")) == 2


async def test_hosts_commit_concurrently(tmp_path: Path, tree: Path) -> None:
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")

    class Named(LocalRunner):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.host = name  # type: ignore[misc]

    await asyncio.gather(*(record(repo, Named(f"h{i}"), policy_for(tree)) for i in range(5)))
    assert sorted(git(repo.path, "ls-tree", "--name-only", "main", "hosts/").split()) == [
        f"hosts/h{i}" for i in range(5)
    ]
    assert git(repo.path, "rev-list", "--count", "main").strip() == "5"


async def test_key_lives_outside_repo_and_is_private(tmp_path: Path) -> None:
    HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    key = tmp_path / "state" / "history.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list((tmp_path / "hist").rglob("history.key"))


def test_builtin_secrets() -> None:
    for p in (
        "/etc/shadow",
        "/etc/gshadow-",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssl/private/a.pem",
        "/etc/swanctl/private/k.pem",
        "/etc/racoon/ipsec.key",
        "/etc/x/private/y",
    ):
        assert is_builtin_secret(p), p
    for p in ("/etc/ssh/ssh_host_ed25519_key.pub", "/etc/hosts", "/etc/ssl/certs/a.pem", "/etc/private"):
        assert not is_builtin_secret(p), p


async def test_the_mail_diff_is_capped_with_a_note(tmp_path: Path, tree: Path) -> None:
    """A huge change (a log dumped into /etc) never makes a huge mail: the diff is cut at the
    cap and says where the rest is."""
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    runner = LocalRunner()
    policy = policy_for(tree)
    await record(repo, runner, policy)
    (tree / "dump.conf").write_text("".join(f"line {i} of a very large file\n" for i in range(40_000)))
    _, (_, info) = await record(repo, runner, policy)
    assert info is not None
    full = await repo.diff(info.sha, "local", max_bytes=10_000_000)  # type: ignore[attr-defined]
    assert len(full) > 1_000_000 and "line 39999 of" in full  # positive evidence: a big diff
    capped = await repo.diff(info.sha, "local")  # type: ignore[attr-defined]
    assert capped.startswith(full[:200_000])
    assert capped.endswith("\n[diff truncated at 200000 bytes; see the history repo]\n")
    assert len(capped) < 200_100


async def test_a_siblings_commit_in_flight_is_waited_for_not_called_stale(tmp_path: Path, tree: Path) -> None:
    """Many hosts record at once (the daemon at 300 hosts): while one commit holds the repo (and
    git's HEAD.lock for a moment), another host's commit waits for it instead of failing."""
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    runner = LocalRunner()
    await record(repo, runner, policy_for(tree))
    (tree / "hosts").write_text("changed\n")
    held = repo._lock  # noqa: SLF001 - the sibling's commit holding the repo
    await held.acquire()
    (repo.path / "HEAD.lock").write_text("")  # its update-ref in flight
    waiting = asyncio.ensure_future(record(repo, runner, policy_for(tree)))
    for _ in range(200):  # until the second commit waits on the repo lock (its blobs written)
        await asyncio.sleep(0.01)
        if held._waiters:  # noqa: SLF001
            break
    assert held._waiters and not waiting.done()  # noqa: SLF001
    (repo.path / "HEAD.lock").unlink()  # the sibling's commit ends
    held.release()
    _, (_, info) = await waiting
    assert info is not None
