"""The one git layer (reconciler/gitrepo.py) and the history push of the drift use case, on real
git repos: isolation of git's environment, GitPython reads, hostile names and hostile remotes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from snapshot_local import LocalRunner

from reconciler.drift.history import HistoryError, HistoryRepo, commit_subject
from reconciler.drift.snapshot import PathPolicy, take_snapshot
from reconciler.gitrepo import GitError, GitRepo, OutputTooLarge, UnreadableObject, init_bare, isolated_env


def _commit_file(repo: Path, name: str, data: bytes) -> str:
    env = {**isolated_env(inherit=False), "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x"}  # fmt: skip

    def run(*args: str, stdin: bytes | None = None) -> str:
        argv = ["git", f"--git-dir={repo}", *args]
        return (
            subprocess.run(argv, input=stdin, env=env, capture_output=True, check=True)
            .stdout.decode()
            .strip()
        )

    blob = run("hash-object", "-w", "--stdin", stdin=data)
    tree = run("mktree", stdin=f"100644 blob {blob}\t{name}\n".encode())
    commit = run("commit-tree", tree, "-m", "one")
    run("update-ref", "refs/heads/main", commit)
    return commit


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    path = tmp_path / "r.git"
    init_bare(path, initial_branch="main")
    return path


async def test_reads_through_gitpython(bare: Path) -> None:
    commit = _commit_file(bare, "meta.json", b"{}\n")
    repo = GitRepo(bare)
    assert await repo.resolve("refs/heads/main") == commit
    assert await repo.resolve(commit[:10]) == commit
    assert await repo.resolve("refs/heads/nope") is None
    assert await repo.resolve("not a rev ^^ {") is None
    assert await repo.read_blob(commit, "meta.json") == b"{}\n"
    assert await repo.read_blob(commit, "absent.json") is None
    info = await repo.commit(commit)
    assert info.message.startswith("one") and info.parents == () and info.signature == ""
    with pytest.raises(UnreadableObject):
        await repo.commit("0" * 40)
    with pytest.raises(GitError):
        await repo.read_blob("0" * 40, "meta.json")
    assert await repo.is_ancestor(commit, commit)
    repo.close()
    assert await repo.resolve("refs/heads/main") == commit  # reopened after close


async def test_git_never_sees_our_secrets_or_global_config(
    bare: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECONCILER_SMTP_PASSWORD", "hunter2")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[alias]\n    trap = !touch /tmp/never\n[core]\n    pager = false\n")
    monkeypatch.setenv("HOME", str(home))
    repo = GitRepo(bare)
    res = await repo.run(["var", "GIT_COMMITTER_IDENT"], env={"GIT_COMMITTER_NAME": "x",
                                                             "GIT_COMMITTER_EMAIL": "x@y"})  # fmt: skip
    assert res.code == 0
    assert "hunter2" not in repr(repo.env) and "GIT_DIR" not in repo.env
    assert repo.env["GIT_CONFIG_GLOBAL"] == os.devnull and repo.env["GIT_CONFIG_NOSYSTEM"] == "1"
    out = await repo.run(["config", "--get", "alias.trap"])
    assert out.code != 0  # the user's global config is not read


async def test_output_is_capped_and_timeouts_raise_the_callers_error(bare: Path) -> None:
    commit = _commit_file(bare, "big", os.urandom(300_000))
    repo = GitRepo(bare, error=HistoryError)
    with pytest.raises(OutputTooLarge):
        await repo.run(["cat-file", "blob", f"{commit}:big"], max_output=100_000)
    with pytest.raises(HistoryError, match="timed out"):
        await repo.run(["slow"], config=[("alias.slow", "!sleep 30")], timeout=0.3)


# ---------------------------------------------------------------- history: names and pushes


def _policy(root: Path) -> PathPolicy:
    return PathPolicy(roots=(str(root),))


async def _record(repo: HistoryRepo, root: Path) -> str | None:
    runner = LocalRunner()
    prev = await repo.recorded(runner.host)
    snap = await take_snapshot(runner, _policy(root), lambda p: prev[p].sha256 if p in prev else None)
    prep = await repo.prepare(snap, prev)
    info = await repo.commit(prep, commit_subject(prep.changes, (str(root),)))
    return info.sha if info is not None else None


async def test_a_name_gitpython_refuses_does_not_blind_the_history(tmp_path: Path) -> None:
    """git on Linux stores ".g\u200cit" (an HFS alias of .git) in a tree; GitPython refuses to
    parse such a tree. The history reads host trees with git itself, so the file is recorded,
    and a second scan still reads the history back (no crash, no "no drift")."""
    root = tmp_path / "etc"
    root.mkdir()
    (root / ".g\u200cit").write_text("hostile\n")
    (root / "motd").write_text("a\n")
    repo = HistoryRepo.open(tmp_path / "hist", tmp_path / "state")
    assert await _record(repo, root) is not None
    (root / ".g\u200cit").write_text("hostile, changed\n")
    second = await _record(repo, root)
    assert second is not None
    changes = await repo.changes_in(second, "local")
    assert [c.path for c in changes.changes] == [f"{root}/.g\u200cit"]
    assert "hostile, changed" in await repo.diff(second, "local")


async def test_gitpython_processes_do_not_inherit_our_secrets(
    bare: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GitPython starts git from os.environ: the daemon's published SMTP password and a
    caller's GIT_* must not reach its persistent cat-file."""
    commit = _commit_file(bare, "meta.json", b"{}\n")
    monkeypatch.setenv("RECONCILER_SMTP_PASSWORD", "hunter2")
    monkeypatch.setenv("GIT_ALTERNATE_OBJECT_DIRECTORIES", "/nonexistent/objects")
    repo = GitRepo(bare)
    assert await repo.read_blob(commit, "meta.json") == b"{}\n"
    cat_files = [
        p for p in Path("/proc").iterdir()
        if p.name.isdigit() and _cmdline(p).startswith(b"git\0cat-file") and str(os.getpid()) == _ppid(p)
    ]  # fmt: skip
    assert cat_files, "GitPython's persistent cat-file is running"
    for proc in cat_files:
        env = (proc / "environ").read_bytes().split(b"\0")
        assert b"RECONCILER_SMTP_PASSWORD=hunter2" not in env
        assert b"GIT_ALTERNATE_OBJECT_DIRECTORIES=/nonexistent/objects" not in env
    repo.close()


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(p: Path) -> str:
    try:
        return (p / "stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""
