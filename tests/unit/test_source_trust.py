"""Monotonic trust against real git repos and real SSH signatures: the good commit only moves
forward; a rollback needs an admin; a commit refused by the vet hook (the daemon's bounded
render) never becomes good; a refused head is not evaluated again on every poll."""

# ruff: noqa: F811 (the keys fixture of test_source is a parameter of every test)
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_source import Repo, fake_loader, git, keys  # noqa: F401 (keys: a fixture)

from reconciler.daemon.config import SourceConfig, VerifyMode
from reconciler.daemon.source import GOOD_REF, FleetSource
from reconciler.daemon.source_types import Refusal, RollbackRefused


class Counting:
    """A loader and a vet hook that count their calls; 'hang' in fleet.yaml fails the vet."""

    def __init__(self) -> None:
        self.loads = 0
        self.vets: list[str] = []

    def load(self, files: Mapping[str, bytes]) -> dict[str, str]:
        self.loads += 1
        return fake_loader(files)

    async def vet(self, commit: str, fleet: Any) -> Refusal | None:
        self.vets.append(commit)
        if "hang" in fleet.get("fleet.yaml", ""):
            return Refusal("render-limit", f"commit {commit[:12]}: templates/x.j2:1: took longer than 1 s")
        return None


def source(
    tmp_path: Path, repo: Repo, keys: Path, count: Counting, *, verify: VerifyMode = VerifyMode.SSH
) -> FleetSource:
    cfg = SourceConfig(
        url=f"file://{repo.path}",
        verify=verify,
        allowed_signers=keys / "allowed_signers" if verify is VerifyMode.SSH else None,
    )
    return FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=count.load, vet=count.vet)


def good_ref(tmp_path: Path) -> str:
    return git(tmp_path, "--git-dir", str(tmp_path / "state" / "mirror.git"), "rev-parse", GOOD_REF)


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> Repo:
    return Repo(tmp_path / "fleet", keys)


async def test_force_push_back_to_an_older_signed_commit_is_refused(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    count = Counting()
    c1 = repo.commit("name: port-8444-open\n", key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    c2 = repo.commit("name: port-8444-closed\n", key="admin")
    assert (await src.refresh()).good == c2
    git(repo.path, "reset", "-q", "--hard", c1)  # `git push -f origin <old>:main`
    loads = count.loads
    st = await src.refresh()
    assert st.head == c1 and st.good == c2 and not st.changed
    assert st.fleet["fleet.yaml"] == "name: port-8444-closed\n"
    assert st.rejection is not None and st.rejection.kind == "rollback" and st.rejection.good == c2
    assert f"commit {c1[:12]} is older than the applied commit {c2[:12]}" in st.rejection.reason
    assert f"--allow-rollback {c1[:12]}" in st.rejection.reason
    assert good_ref(tmp_path) == c2
    for _ in range(3):  # every poll: the same answer, nothing loaded or rendered again
        again = await src.refresh()
        assert again.rejection == st.rejection and again.good == c2
    assert count.loads == loads


async def test_unsigned_commit_on_top_of_an_old_one_is_refused(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    count = Counting()
    c1 = repo.commit(key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    c2 = repo.commit(key="admin")
    await src.refresh()
    git(repo.path, "reset", "-q", "--hard", c1)
    c3 = repo.commit("name: sneaky\n")
    st = await src.refresh()
    assert st.head == c3 and st.good == c2
    assert st.rejection is not None and st.rejection.kind == "rollback"
    assert "does not descend from the applied commit" in st.rejection.reason
    assert f"commit {c3[:12]} is not signed" in st.rejection.reason


async def test_without_verification_trust_still_only_moves_forward(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    count = Counting()
    c1 = repo.commit()
    src = source(tmp_path, repo, keys, count, verify=VerifyMode.NONE)
    await src.refresh()
    c2 = repo.commit()
    await src.refresh()
    git(repo.path, "reset", "-q", "--hard", c1)
    st = await src.refresh()
    assert st.good == c2 and st.rejection is not None and st.rejection.kind == "rollback"
    assert "also refused" not in st.rejection.reason


async def test_a_signed_revert_commit_moves_forward(tmp_path: Path, repo: Repo, keys: Path) -> None:
    count = Counting()
    repo.commit("name: open\n", key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    repo.commit("name: closed\n", key="admin")
    await src.refresh()
    git(
        repo.path,
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={keys / 'admin'}",
        "revert",
        "--no-edit",
        "-S",
        "HEAD",
    )
    revert = git(repo.path, "rev-parse", "HEAD")
    st = await src.refresh()
    assert st.good == revert and st.rejection is None and st.fleet["fleet.yaml"] == "name: open\n"


async def test_a_side_branch_merged_under_a_bad_head_is_not_a_candidate(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    """M (unsigned merge) has first parent A, a signed commit on a branch made from an old
    commit, and second parent G (good). The newest verified first-parent ancestor of M is A,
    which does not descend from G: taking it would be a rollback."""
    count = Counting()
    old = repo.commit("name: old\n", key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    good = repo.commit("name: good\n", key="admin")
    await src.refresh()
    git(repo.path, "checkout", "-q", "-b", "side", old)
    side = repo.commit("name: side\n", key="admin")
    git(repo.path, "merge", "-q", "--no-ff", "-s", "ours", "-m", "merge", good)  # unsigned
    merge = git(repo.path, "rev-parse", "HEAD")
    git(repo.path, "branch", "-q", "-f", "main", merge)
    st = await src.refresh()
    assert st.head == merge and st.good == good and st.good != side
    assert st.rejection is not None and st.rejection.kind == "unsigned"


async def test_a_commit_the_vet_refuses_never_becomes_good(tmp_path: Path, repo: Repo, keys: Path) -> None:
    count = Counting()
    c1 = repo.commit(key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    bad = repo.commit("name: hang\n", key="admin")
    st = await src.refresh()
    assert st.good == c1 and good_ref(tmp_path) == c1 and not st.changed
    assert st.rejection is not None and st.rejection.kind == "render-limit" and st.rejection.commit == bad
    for _ in range(3):
        await src.refresh()
    assert count.vets.count(bad) == 1
    fixed = repo.commit("name: fixed\n", key="admin")  # on top of the refused one: fine, it is signed
    st = await src.refresh()
    assert st.good == fixed and st.rejection is None


async def test_a_restart_does_not_use_a_good_commit_the_vet_now_refuses(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    count = Counting()
    c1 = repo.commit("name: slow-later\n", key="admin")
    await source(tmp_path, repo, keys, Counting()).refresh()  # accepted then (no "hang" check yet)
    count_vet = count.vet

    async def stricter(commit: str, fleet: Any) -> Refusal | None:
        if "slow" in fleet["fleet.yaml"]:  # e.g. render.timeout lowered since
            return Refusal("render-limit", "now refused")
        return await count_vet(commit, fleet)

    cfg = SourceConfig(
        url=f"file://{repo.path}", verify=VerifyMode.SSH, allowed_signers=keys / "allowed_signers"
    )
    again = FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=count.load, vet=stricter)
    await again.prepare()
    assert again.good == c1 and again.fleet is None
    assert (
        again.rejection is not None
        and again.rejection.commit == c1
        and again.rejection.kind == "render-limit"
    )
    st = await again.refresh()
    assert st.fleet is None and st.rejection is not None and count.loads == 1  # not loaded again


async def test_rollback_by_an_admin(tmp_path: Path, repo: Repo, keys: Path) -> None:
    count = Counting()
    c1 = repo.commit("name: one\n", key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    c2 = repo.commit("name: two\n", key="admin")
    await src.refresh()
    with pytest.raises(RollbackRefused, match="already the applied commit"):
        await src.rollback(c2)
    with pytest.raises(RollbackRefused, match="not a commit id"):
        await src.rollback("HEAD~1")
    with pytest.raises(RollbackRefused, match="not in the fetched repo"):
        await src.rollback("0123456789abcdef")
    c3 = repo.commit("name: three\n", key="admin")
    with pytest.raises(RollbackRefused, match="descends from the applied commit"):
        await src.rollback(c3)
    git(repo.path, "reset", "-q", "--hard", c1)
    unsigned = repo.commit("name: unsigned-old\n")
    with pytest.raises(RollbackRefused, match=f"commit {unsigned[:12]} is not signed"):
        await src.rollback(unsigned)
    with pytest.raises(RollbackRefused, match="not on branch main"):
        await src.rollback(c3)  # fetched before, no longer on the branch
    git(repo.path, "reset", "-q", "--hard", c1)
    done = await src.rollback(c1[:10])
    assert (done.commit, done.previous, done.head) == (c1, c2, c1)
    assert src.good == c1 and src.fleet["fleet.yaml"] == "name: one\n" and good_ref(tmp_path) == c1
    st = await src.refresh()
    assert st.good == c1 and st.rejection is None
    restarted = source(tmp_path, repo, keys, Counting())
    await restarted.prepare()
    assert restarted.good == c1


async def test_rollback_target_below_a_bad_head_keeps_refusing_the_head(
    tmp_path: Path, repo: Repo, keys: Path
) -> None:
    count = Counting()
    c1 = repo.commit(key="admin")
    src = source(tmp_path, repo, keys, count)
    await src.refresh()
    repo.commit(key="admin")
    await src.refresh()
    git(repo.path, "reset", "-q", "--hard", c1)
    unsigned = repo.commit("name: sneaky\n")
    done = await src.rollback(c1)
    assert done.head == unsigned
    st = await src.refresh()
    assert st.good == c1 and st.rejection is not None and st.rejection.kind == "unsigned"


async def test_the_good_ref_ahead_of_the_state_store_wins(tmp_path: Path, repo: Repo, keys: Path) -> None:
    """A crash after the ref moved and before the daemon's store did: the store's older commit
    must not become the floor again."""
    c1 = repo.commit(key="admin")
    await source(tmp_path, repo, keys, Counting()).refresh()
    c2 = repo.commit(key="admin")
    await source(tmp_path, repo, keys, Counting()).refresh()
    cfg = SourceConfig(
        url=f"file://{repo.path}", verify=VerifyMode.SSH, allowed_signers=keys / "allowed_signers"
    )
    src = FleetSource(cfg, tmp_path / "state" / "mirror.git", loader=fake_loader, last_good=c1)
    await src.prepare()
    assert src.good == c2


async def test_more_new_commits_than_max_verify_are_refused_without_verifying_them(
    tmp_path: Path, repo: Repo, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push of more new commits than MAX_VERIFY (a history bomb, or a forgotten
    source.signed_after) is refused as bad-config naming the limit; the hosts stay on the good
    commit, and a push within the limit is taken."""
    from reconciler.daemon import source as source_module

    monkeypatch.setattr(source_module, "MAX_VERIFY", 3)
    count = Counting()
    good = repo.commit("name: one\n", key="admin")
    src = source(tmp_path, repo, keys, count)
    assert (await src.refresh()).good == good
    for i in range(4):
        head = repo.commit(f"name: bomb-{i}\n", key="admin")
    st = await src.refresh()
    assert st.head == head and st.good == good, st  # fetched the new head, did not take it
    assert st.rejection is not None and st.rejection.kind == "bad-config"
    assert "4 new commits to verify (limit 3)" in st.rejection.reason
    assert good_ref(tmp_path) == good
    git(repo.path, "reset", "-q", "--hard", good)
    for i in range(3):
        head = repo.commit(f"name: ok-{i}\n", key="admin")
    assert (await src.refresh()).good == head  # within the limit: verified and taken
