"""The /etc history as one branch per host on one remote (reconciler/drift/history_branches.py):
several replicas' history repos (real git) pushing to one bare file:// remote."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from snapshot_local import all_objects, git

from reconciler import usecases
from reconciler.drift import history_branches
from reconciler.drift.history import HistoryError, HistoryRepo, commit_subject
from reconciler.drift.history_branches import BRANCHES_HOST, HostBranches, valid_host_ref
from reconciler.drift.snapshot import PathPolicy, take_snapshot
from reconciler.gitrepo import init_bare
from reconciler.host.fake import FakeHost

CANARY = "CANARY-mirror-s3cr3t-91ab"


class Replica:
    """One replica's history repo (its own state dir), writing host trees under ``tmp/etc-<host>``."""

    def __init__(self, tmp: Path, name: str, remote: Path) -> None:
        self.tmp = tmp
        self.repo = HistoryRepo.open(
            tmp / name / "history", tmp / name / "state", remote=f"file://{remote}", branches=BRANCHES_HOST
        )

    async def record(self, host: str, text: str) -> str:
        root = self.tmp / f"etc-{host}"
        root.mkdir(exist_ok=True)
        (root / "motd").write_text(text + "\n")
        (root / "shadow").write_text(f"root:{CANARY}:19000::::::\n")
        runner = FakeHost(root=Path("/"), host=host)
        prev = await self.repo.recorded(host)
        policy = PathPolicy(roots=(str(root),), secret_globs=(f"{root}/shadow",))
        snap = await take_snapshot(runner, policy, lambda p: prev[p].sha256 if p in prev else None)
        prep = await self.repo.prepare(snap, prev)
        info = await self.repo.commit(prep, commit_subject(prep.changes, (str(root),)))
        assert info is not None
        return info.sha

    def local_commits(self, host: str) -> list[str]:
        return git(self.repo.path, "rev-list", "--reverse", "main", "--", f"meta/{host}.json").split()


def branch(remote: Path, host: str) -> str:
    return f"refs/heads/hosts/{host}"


def branch_log(remote: Path, host: str, fmt: str = "%s|%an|%ae|%ad|%cn|%cd") -> list[str]:
    return git(remote, "log", "--reverse", "--date=raw", f"--format={fmt}", branch(remote, host)).splitlines()


def source_log(rep: Replica, commits: list[str], fmt: str = "%s|%an|%ae|%ad|%cn|%cd") -> list[str]:
    return [git(rep.repo.path, "log", "-1", "--date=raw", f"--format={fmt}", c).strip() for c in commits]


def is_ancestor(repo: Path, old: str, new: str) -> bool:
    """A fast-forward from ``old`` to ``new`` (never a rewrite)."""
    args = ["git", f"--git-dir={repo}", "merge-base", "--is-ancestor", old, new]
    return subprocess.run(args, check=False).returncode == 0


def remote_branches(remote: Path) -> list[str]:
    return git(remote, "for-each-ref", "--format=%(refname)").split()


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    path = tmp_path / "remote.git"
    init_bare(path, initial_branch="main")
    git(path, "config", "receive.denyNonFastForwards", "true")  # a forced push would fail loudly
    return path


async def test_two_replicas_one_branch_per_host_with_only_its_commits_and_subtree(
    tmp_path: Path, remote: Path
) -> None:
    a, b = Replica(tmp_path, "r0", remote), Replica(tmp_path, "r1", remote)
    await a.record("web1", "one")
    await a.record("db1", "one")
    await b.record("web2", "one")
    await a.record("web1", "two")
    await asyncio.gather(a.repo.push(), b.repo.push())
    # one branch per host, never main
    assert remote_branches(remote) == [branch(remote, h) for h in ("db1", "web1", "web2")]
    for rep, host in ((a, "web1"), (a, "db1"), (b, "web2")):
        local = rep.local_commits(host)
        # exactly the local commits of that host: message, author, committer and dates
        assert branch_log(remote, host) == source_log(rep, local)
        tip = git(remote, "rev-parse", branch(remote, host)).strip()
        # only that host's part: hosts/<host>/... and meta/<host>.json, as in the local repo
        assert git(remote, "ls-tree", "--name-only", tip).split() == ["hosts", "meta"]
        assert git(remote, "ls-tree", "--name-only", f"{tip}:hosts").split() == [host]
        assert git(remote, "ls-tree", "--name-only", f"{tip}:meta").split() == [f"{host}.json"]
        for side, repo in ((tip, remote), (local[-1], rep.repo.path)):
            assert git(repo, "rev-parse", f"{side}:hosts/{host}") == git(
                rep.repo.path, "rev-parse", f"{local[-1]}:hosts/{host}"
            )
    # nothing new: a second push moves nothing and reads no old commit again
    before = {h: git(remote, "rev-parse", branch(remote, h)) for h in ("db1", "web1")}
    out = await HostBranches(a.repo.path, a.repo._git, a.repo.remote or "", {}).push(await a.repo.head())
    assert out.hosts == () and out.commits == 0
    assert {h: git(remote, "rev-parse", branch(remote, h)) for h in ("db1", "web1")} == before
    # incremental: one new commit, one mirrored commit pushed
    await a.record("web1", "three")
    out = await HostBranches(a.repo.path, a.repo._git, a.repo.remote or "", {}).push(await a.repo.head())
    assert out.hosts == ("web1",) and out.commits == 1
    assert len(branch_log(remote, "web1")) == 3
    # the secret's content is on no branch, in no object of the remote
    assert CANARY.encode() not in all_objects(remote)
    assert "hmac-sha256:" in git(remote, "show", f"{branch(remote, 'web1')}:meta/web1.json")


async def test_a_host_taken_over_by_another_replica_continues_its_branch(
    tmp_path: Path, remote: Path
) -> None:
    a, b = Replica(tmp_path, "r0", remote), Replica(tmp_path, "r1", remote)
    await a.record("web1", "one")
    await a.record("web1", "two")
    await a.repo.push()
    old_tip = git(remote, "rev-parse", branch(remote, "web1")).strip()
    # replica 0 is gone; replica 1 now owns web1 (its history has never seen it)
    await b.record("web1", "two, then edited by hand")
    await b.repo.push()
    new_tip = git(remote, "rev-parse", branch(remote, "web1")).strip()
    assert is_ancestor(remote, old_tip, new_tip)
    assert branch_log(remote, "web1") == source_log(a, a.local_commits("web1")) + source_log(
        b, b.local_commits("web1")
    )
    motd = f"{new_tip}:hosts/web1{tmp_path}/etc-web1/motd"
    assert git(remote, "show", motd) == "two, then edited by hand\n"
    # and back to replica 0 (N changed again): it continues from replica 1's tip, not its own
    await a.record("web1", "four")
    await a.repo.push()
    last = git(remote, "rev-parse", branch(remote, "web1")).strip()
    assert is_ancestor(remote, new_tip, last)
    assert len(branch_log(remote, "web1")) == 4


async def test_a_slow_old_replica_racing_on_one_host_loses_no_commit_and_never_forces(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = Replica(tmp_path, "r0", remote), Replica(tmp_path, "r1", remote)
    await old.record("web1", "one")
    await old.repo.push()
    await old.record("web1", "old replica's late scan")
    await new.record("web1", "new owner's scan")
    tips: list[str] = []
    real = HostBranches._remote_tips

    async def slow(self: HostBranches, hosts: set[str]) -> dict[str, str]:
        listed = await real(self, hosts)
        if self.git_dir == old.repo.path and not tips:
            # the new owner pushes between the old replica's listing and its push
            await new.repo.push()
            tips.append(git(remote, "rev-parse", branch(remote, "web1")).strip())
        return listed

    monkeypatch.setattr(HostBranches, "_remote_tips", slow)
    await old.repo.push()
    final = git(remote, "rev-parse", branch(remote, "web1")).strip()
    assert is_ancestor(remote, tips[0], final)
    subjects = [s.split("|")[0] for s in branch_log(remote, "web1")]
    expected = source_log(old, old.local_commits("web1")[:1]) + source_log(new, new.local_commits("web1"))
    expected += source_log(old, old.local_commits("web1")[1:])
    assert subjects == [s.split("|")[0] for s in expected]  # every commit once, the late one last


async def test_concurrent_pushes_of_one_host_from_two_replicas(tmp_path: Path, remote: Path) -> None:
    a, b = Replica(tmp_path, "r0", remote), Replica(tmp_path, "r1", remote)
    for i in range(4):
        await a.record("web1", f"a{i}")
        await b.record("web1", f"b{i}")
        await asyncio.gather(a.repo.push(), b.repo.push())
    logged = [s.split("|")[0] for s in branch_log(remote, "web1")]
    assert len(logged) == 8  # every local commit of both replicas, each once
    both = source_log(a, a.local_commits("web1")) + source_log(b, b.local_commits("web1"))
    assert sorted(logged) == sorted(s.split("|")[0] for s in both)


async def test_a_crash_between_mirror_and_push_then_the_next_push(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = Replica(tmp_path, "r0", remote)
    await a.record("web1", "one")
    await a.record("web1", "two")

    async def crash(self: HostBranches, tips: dict[str, str]) -> tuple[set[str], str | None]:
        raise RuntimeError("killed after building, before pushing")

    monkeypatch.setattr(HostBranches, "_push_refs", crash)
    with pytest.raises(RuntimeError):
        await a.repo.push()
    assert remote_branches(remote) == []
    assert git(a.repo.path, "for-each-ref", "refs/history-mirror/") == ""  # nothing recorded as pushed
    monkeypatch.undo()
    await a.record("web1", "three")
    await a.repo.push()
    assert [s.split("|")[0] for s in branch_log(remote, "web1")] == [
        s.split("|")[0] for s in source_log(a, a.local_commits("web1"))
    ]


async def test_a_crash_after_the_remote_accepted_pushes_nothing_twice(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = Replica(tmp_path, "r0", remote)
    await a.record("web1", "one")
    await a.repo.push()
    await a.record("web1", "two")
    await a.record("db1", "one")
    real = HostBranches._update_refs

    async def crash(self: HostBranches, updates: list[tuple[str, str, str | None]]) -> None:
        raise RuntimeError("killed after the push, before the local refs moved")

    monkeypatch.setattr(HostBranches, "_update_refs", crash)
    with pytest.raises(RuntimeError):
        await a.repo.push()
    pushed = {h: git(remote, "rev-parse", branch(remote, h)).strip() for h in ("web1", "db1")}
    monkeypatch.setattr(HostBranches, "_update_refs", real)
    await a.repo.push()  # finds the remote tips among the commits it builds: pushes nothing
    assert {h: git(remote, "rev-parse", branch(remote, h)).strip() for h in ("web1", "db1")} == pushed
    assert len(branch_log(remote, "web1")) == 2 and len(branch_log(remote, "db1")) == 1
    await a.record("web1", "three")
    await a.repo.push()
    assert len(branch_log(remote, "web1")) == 3
    assert (
        git(a.repo.path, "rev-parse", "refs/history-mirror/tip/web1").strip()
        == git(remote, "rev-parse", branch(remote, "web1")).strip()
    )


@pytest.mark.parametrize(
    "name",
    ["web1", "a", "db-2", "x" * 63, "Web1", "a/b", "..", "a..b", "a.lock", ".a", "a b", "a~1", "a:b",
     "a@{1}", "-a", "a\nb", "a*", "", "a.", "ä"],
)  # fmt: skip
def test_only_fleet_host_names_become_branches_and_they_are_valid_refs(name: str) -> None:
    ok = valid_host_ref(name)
    assert ok == (name in ("web1", "a", "db-2", "x" * 63))
    if ok:
        subprocess.run(["git", "check-ref-format", f"refs/heads/hosts/{name}"], check=True)


async def test_a_host_name_that_cannot_be_a_branch_is_refused_by_name(tmp_path: Path, remote: Path) -> None:
    a = Replica(tmp_path, "r0", remote)
    await a.record("web1", "one")
    await a.record("Bad..Name", "one")  # not a fleet name (the schema refuses it); here from a repo
    with pytest.raises(HistoryError, match=r"cannot name a branch.*'Bad\.\.Name'"):
        await a.repo.push()
    assert remote_branches(remote) == [branch(remote, "web1")]  # the others are pushed
    await a.record("web1", "two")
    await a.repo.push()  # refused once, then not in the way
    assert len(branch_log(remote, "web1")) == 2


async def test_an_unreachable_remote_is_reported_without_its_credentials(tmp_path: Path) -> None:
    a = Replica(tmp_path, "r0", tmp_path / "unused.git")
    await a.record("web1", "one")
    a.repo.remote = "https://deploy:s3cret-token@127.0.0.1:9/history.git"
    with pytest.raises(HistoryError) as err:
        await a.repo.push()
    assert "s3cret-token" not in str(err.value) and "***@127.0.0.1:9" in str(err.value)
    assert git(a.repo.path, "for-each-ref", "refs/history-mirror/") == ""


async def test_a_branch_contended_past_the_attempts_is_an_error(
    tmp_path: Path, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Replica(tmp_path, "r0", remote), Replica(tmp_path, "r1", remote)
    await a.record("web1", "one")
    await a.record("db1", "one")
    real = HostBranches._push_refs
    n = [0]

    async def always_behind(self: HostBranches, tips: dict[str, str]) -> tuple[set[str], str | None]:
        if self.git_dir == a.repo.path:  # replica 1 pushes web1 just before each of replica 0's pushes
            n[0] += 1
            await b.record("web1", f"b{n[0]}")
            await b.repo.push()
        return await real(self, tips)

    monkeypatch.setattr(history_branches.HostBranches, "_push_refs", always_behind)
    with pytest.raises(HistoryError, match="still moved by another writer.*refs/heads/hosts/web1"):
        await a.repo.push()
    assert n[0] == history_branches.MAX_ATTEMPTS
    assert len(branch_log(remote, "db1")) == 1  # the uncontended host went through


async def test_the_drift_use_case_pushes_host_branches_and_reports_failures(
    tmp_path: Path, remote: Path
) -> None:
    """The daemon's path (usecases.Drift, HistoryPush): host branches, never main; a failure is
    an event (history-push-failed in the daemon), never an exception."""
    events: list[str] = []
    drift = usecases.Drift.open(
        tmp_path / "state", remote=f"file://{remote}", branches=BRANCHES_HOST, on_push_error=events.append
    )
    rep = Replica(tmp_path, "r0", remote)
    rep.repo = drift.history
    await rep.record("web1", "one")
    assert await drift.push() is None and events == []
    assert remote_branches(remote) == [branch(remote, "web1")]
    drift.history.remote = f"file://{tmp_path}/gone.git"
    await rep.record("web1", "two")
    error = await drift.push()
    assert error is not None and events == [error] and "gone.git" in error


KILLED_MID_PUSH = """
import asyncio, os, signal, sys
from pathlib import Path
from reconciler.drift.history import HistoryRepo
from reconciler.drift.history_branches import HostBranches

async def die(self, tips):  # the objects are written; the process dies before the push
    os.kill(os.getpid(), signal.SIGKILL)

HostBranches._push_refs = die
repo = HistoryRepo.open(Path(sys.argv[1]), Path(sys.argv[2]), remote=sys.argv[3], branches="host")
asyncio.run(repo.push())
"""


async def test_a_process_killed_between_mirror_and_push(tmp_path: Path, remote: Path) -> None:
    a = Replica(tmp_path, "r0", remote)
    await a.record("web1", "one")
    await a.record("web1", "two")
    args = [str(a.repo.path), str(tmp_path / "r0" / "state"), a.repo.remote or ""]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_MID_PUSH, *args)
    assert await proc.wait() == -signal.SIGKILL
    assert remote_branches(remote) == []
    await a.repo.push()
    assert len(branch_log(remote, "web1")) == 2  # each commit once
    assert git(a.repo.path, "rev-parse", "refs/history-mirror/tip/web1") == git(
        remote, "rev-parse", branch(remote, "web1")
    )


async def test_a_branch_the_remote_refuses_is_reported_and_the_others_recorded(
    tmp_path: Path, remote: Path
) -> None:
    hook = remote / "hooks" / "update"
    hook.write_text('#!/bin/sh\n[ "$1" != refs/heads/hosts/db1 ]\n')  # refuses db1's branch only
    hook.chmod(0o755)
    a = Replica(tmp_path, "r0", remote)
    await a.record("web1", "one")
    await a.record("db1", "one")
    with pytest.raises(HistoryError, match=r"refs/heads/hosts/db1: \[remote rejected\] \(hook declined\)"):
        await a.repo.push()
    assert remote_branches(remote) == [branch(remote, "web1")]
    assert git(a.repo.path, "for-each-ref", "--format=%(refname)", "refs/history-mirror/tip/").split() == [
        "refs/history-mirror/tip/web1"
    ]
    hook.unlink()
    await a.repo.push()
    assert len(branch_log(remote, "web1")) == 1 and len(branch_log(remote, "db1")) == 1
