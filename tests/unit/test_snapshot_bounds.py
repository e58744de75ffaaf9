"""Drift that cannot be blinded: large and sparse files, any byte string as a name, names git
refuses, files that vanish, block or grow mid-scan, files that become (or stop being) secret.

Real sh/find/sha256sum/grep/tar and real git on a temp tree; races are won on purpose by fault
injection (a ``sha256sum`` shim first on PATH, or a runner that edits files between the
manifest and the fetch)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from snapshot_local import LocalRunner, all_objects, git, git_bytes

from reconciler.drift.fetch import FETCH_SCRIPT
from reconciler.drift.history import HistoryRepo, Prepared, Recall, Recorded, git_storable
from reconciler.drift.scan import commit_message, trailer
from reconciler.drift.snapshot import (
    ENDS_BYTES,
    LARGE_NOTE,
    MANIFEST_SCRIPT,
    PathPolicy,
    Snapshot,
    display_path,
    take_snapshot,
)
from reconciler.fleet.model import DriftMode
from reconciler.host.fake import FakeResult as Result

CANARY = b"CANARY-b0unds-93c1"
KEY = b"-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + CANARY + b"\n-----END RSA PRIVATE KEY-----\n"


async def scan(
    repo: HistoryRepo, runner: LocalRunner, policy: PathPolicy
) -> tuple[Snapshot, Prepared, str, str | None]:
    """One drift scan's history part: snapshot, prepare, the commit message, commit."""
    prev = await repo.recorded(runner.host)
    recall = Recall(repo, prev)
    snap = await take_snapshot(
        runner, policy, recall.sha256, recorded_large=recall.large, secret_unchanged=recall.secret_unchanged,
        timeout=20,
    )  # fmt: skip
    prep = await repo.prepare(snap, prev)
    msg, _ = commit_message(
        prep.changes, policy.roots, {}, mode=DriftMode.REPORT, fleet_commit=None, baseline=not prev,
        entries=len(snap.entries), content_secrets=snap.content_secrets, notes=snap.warnings,
    )  # fmt: skip
    info = await repo.commit(prep, msg)
    return snap, prep, msg, info.sha if info else None


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    root = tmp_path / "etc"
    (root / "app").mkdir(parents=True)
    (root / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "app" / "app.conf").write_text("port = 80\n")
    return root


@pytest.fixture
def repo(tmp_path: Path) -> HistoryRepo:
    return HistoryRepo.open(tmp_path / "hist", tmp_path / "state")


def meta(repo: HistoryRepo, host: str = "local") -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = json.loads(git(repo.path, "show", f"main:meta/{host}.json"))
    return data


# ---------------------------------------------------------------- large and sparse files


async def test_sparse_40g_file_recorded_by_size_mtime_and_ends_within_seconds(
    etc: Path, repo: HistoryRepo
) -> None:
    big = etc / "big.img"
    with open(big, "wb") as f:
        f.truncate(40 << 30)
    st = big.stat()
    assert st.st_size == 40 << 30 and st.st_blocks * 512 < 1 << 20  # really sparse: nothing to read
    policy = PathPolicy(roots=(str(etc),))
    started = time.monotonic()
    snap, _, _, sha = await scan(repo, LocalRunner(), policy)
    assert time.monotonic() - started < 5 and sha
    assert snap.too_large == frozenset({str(big)}) and str(big) not in snap.contents
    rec = meta(repo)[str(big)]
    zeros = hashlib.sha256(bytes(2 * ENDS_BYTES)).hexdigest()
    assert rec["stored"] == "large" and rec["size"] == 40 << 30 and rec["ends_sha256"] == zeros
    assert rec["mtime"] == pytest.approx(st.st_mtime, abs=1e-3)
    marker = git(repo.path, "show", f"main:hosts/local{big}")
    assert LARGE_NOTE in marker and str(40 << 30) in marker

    # unchanged: nothing committed, still fast
    started = time.monotonic()
    assert (await scan(repo, LocalRunner(), policy))[3] is None
    assert time.monotonic() - started < 5

    # a write in the last block: the new mtime says it changed, the ends hash says where
    with open(big, "r+b") as f:
        f.seek((40 << 30) - 10)
        f.write(b"tail-edit")
    runner = LocalRunner()
    _, prep, msg, sha = await scan(repo, runner, policy)
    assert sha and prep.changes.changed == (str(big),) and len(runner.calls) == 2  # manifest, ends hash
    assert "large file: mtime changed, first or last 64 KiB changed" in msg
    # (the ends are hashed again only when size or mtime move: the no-op scan reads nothing)
    runner = LocalRunner()
    assert (await scan(repo, runner, policy))[3] is None and len(runner.calls) == 1
    # touched only: the mtime is recorded too
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, _, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and "large file: mtime changed" in msg
    # shrunk under the bound: its content is recorded from then on
    with open(big, "r+b") as f:
        f.truncate(100)
    _, _, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and "no longer a large file" in msg
    assert git_bytes(repo.path, "show", f"main:hosts/local{big}") == bytes(100)


async def test_size_bound_is_configurable(etc: Path, repo: HistoryRepo) -> None:
    data = os.urandom(3 << 20)
    (etc / "three-mib.bin").write_bytes(data)
    snap, _, _, _ = await scan(repo, LocalRunner(), PathPolicy(roots=(str(etc),), max_file_bytes=2 << 20))
    e = snap.entries[str(etc / "three-mib.bin")]
    assert (
        e.sha256 is None
        and e.ends_sha256 == hashlib.sha256(data[:ENDS_BYTES] + data[-ENDS_BYTES:]).hexdigest()
    )
    assert snap.fetched == 2  # hosts, app.conf


# ---------------------------------------------------------------- names


async def test_any_byte_string_is_a_name(etc: Path, repo: HistoryRepo) -> None:
    names = {
        b"bad\xffname.conf": "bad\\xffname.conf",
        b"caf\xc3\xa9.conf": "caf\u00e9.conf",
        b"nl\nDrift: no": "nl\\nDrift: no",
        b"tab\tname": "tab\\tname",
        b"back\\slash": "back\\\\slash",
        b"bidi\xe2\x80\xaeevil.conf": "bidi\\u202eevil.conf",
        b"esc\x1b[31mred": "esc\\x1b[31mred",
    }
    root = os.fsencode(etc)
    for raw in names:
        with open(root + b"/" + raw, "wb") as f:
            f.write(b"v1 " + raw + b"\n")
    policy = PathPolicy(roots=(str(etc),))
    snap, _, _, sha = await scan(repo, LocalRunner(), policy)
    assert sha and not snap.warnings
    tree = git_bytes(repo.path, "ls-tree", "-r", "-z", "--name-only", "main").split(b"\0")
    for raw in names:  # the tree entries are the host's bytes
        assert b"hosts/local" + root + b"/" + raw in tree
    recorded = await repo.recorded("local")
    for raw in names:
        assert os.fsdecode(root + b"/" + raw) in recorded  # metadata round-trips exactly
    for raw in names:
        with open(root + b"/" + raw, "ab") as f:
            f.write(b"v2\n")
    _, prep, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and len(prep.changes.changed) == len(names)
    for shown in names.values():
        assert f"  {etc}/{shown}\n" in msg
    assert "\x1b" not in msg and "\u202e" not in msg
    assert [ln for ln in msg.splitlines() if ln.startswith("Drift:")] == ["Drift: yes"]
    assert trailer(msg, "Drift") == "yes"
    assert git(repo.path, "log", "-1", "--format=%B", "main").rstrip() == msg.rstrip()  # valid UTF-8
    diff = await repo.diff(sha, "local")
    assert "bad\\xffname.conf" in diff and "+v2" in diff
    assert display_path(f"{etc}/plain.conf") == f"{etc}/plain.conf"


async def test_names_git_refuses_are_kept_in_the_metadata(etc: Path, repo: HistoryRepo) -> None:
    (etc / "app" / ".GIT").mkdir()
    (etc / "app" / ".GIT" / "config").write_text("[core]\n")
    (etc / "app" / "git~1").write_text("short name\n")
    (etc / "app" / ".git. ").write_text("ntfs alias\n")
    os.symlink("/etc/hosts", etc / "app" / ".gitmodules")
    policy = PathPolicy(roots=(str(etc),))
    snap, prep, _, sha = await scan(repo, LocalRunner(), policy)
    assert sha
    refused = [f"{etc}/app/.GIT/config", f"{etc}/app/git~1", f"{etc}/app/.git. "]
    for p in refused:
        assert not git_storable(p, "file") and prep.meta[p].stored == "hash-only" and prep.meta[p].sha256
    assert not git_storable(f"{etc}/app/.gitmodules", "link") and git_storable(
        f"{etc}/app/.gitmodules", "file"
    )
    assert prep.meta[f"{etc}/app/.gitmodules"].target == "/etc/hosts"
    files = git(repo.path, "ls-tree", "-r", "--name-only", "main")
    assert f"hosts/local{etc}/hosts" in files and "git~1" not in files and ".GIT" not in files
    # a content change and a mode change of such a file: recorded, never a failed scan
    (etc / "app" / "git~1").write_text("short name, changed\n")
    os.chmod(etc / "app" / ".GIT" / "config", 0o755)
    _, prep, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and set(prep.changes.changed) == {f"{etc}/app/git~1", f"{etc}/app/.GIT/config"}
    assert "a name git cannot store: recorded by sha256 only" in msg


# ---------------------------------------------------------------- files that misbehave mid-scan


def shim(tmp_path: Path, body: str) -> dict[str, str]:
    """A ``sha256sum`` first on PATH that runs ``body`` and then the real one (fault injection:
    it wins a race against the scan on purpose)."""
    bin_dir = tmp_path / "shim"
    bin_dir.mkdir()
    (bin_dir / "sha256sum").write_text(f'#!/bin/sh\n{body}\nexec /usr/bin/sha256sum "$@"\n')
    os.chmod(bin_dir / "sha256sum", 0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


async def test_file_vanishing_between_listing_and_hashing(
    tmp_path: Path, etc: Path, repo: HistoryRepo
) -> None:
    policy = PathPolicy(roots=(str(etc),))
    (etc / "gone.conf").write_text("here\n")
    await scan(repo, LocalRunner(), policy)
    (etc / "hosts").write_text("127.0.0.1 localhost\n192.0.2.5 x\n")
    runner = LocalRunner(shim(tmp_path, f"rm -f {etc}/gone.conf"))
    snap, prep, msg, sha = await scan(repo, runner, policy)
    assert sha and f"{etc}/gone.conf vanished during the scan" in snap.warnings
    assert prep.changes.changed == (f"{etc}/hosts",) and prep.changes.removed == (f"{etc}/gone.conf",)
    assert "Not recorded normally this scan (the rest was):" in msg


async def test_fifo_swapped_in_while_hashing_costs_one_time_limit(
    tmp_path: Path, etc: Path, repo: HistoryRepo
) -> None:
    """A user who can write in a recorded directory swaps a file for a FIFO after the listing:
    sha256sum would block for ever. The stage stops at its time limit; the scan finishes, says
    so, and keeps the last recorded content of what it could not read."""
    policy = PathPolicy(roots=(str(etc),))
    (etc / "app" / "trap.conf").write_text("plain\n")
    await scan(repo, LocalRunner(), policy)
    runner = LocalRunner(shim(tmp_path, f"rm -f {etc}/app/trap.conf && mkfifo {etc}/app/trap.conf"))
    started = time.monotonic()
    snap, prep, msg, sha = await scan(repo, runner, policy)  # timeout 20 s: 5 s per stage
    assert time.monotonic() - started < 12
    assert "hashing stopped after its time limit (a file that blocks or grows while read?)" in snap.warnings
    assert f"{etc}/hosts not read this scan: its recorded content is kept" in snap.warnings
    assert prep.meta[str(etc / "hosts")].sha256 == hashlib.sha256(b"127.0.0.1 localhost\n").hexdigest()
    assert f"{etc}/app/trap.conf vanished during the scan" in snap.warnings  # no longer a file
    assert prep.changes.paths("changed", "new", "meta") == ()  # nothing else reads as changed


async def test_fifo_swapped_in_before_the_fetch_never_blocks(etc: Path, repo: HistoryRepo) -> None:
    policy = PathPolicy(roots=(str(etc),))
    await scan(repo, LocalRunner(), policy)
    (etc / "app" / "app.conf").write_text("changed\n")
    (etc / "hosts").write_text("changed too\n")

    def swap() -> None:
        (etc / "app" / "app.conf").unlink()
        os.mkfifo(etc / "app" / "app.conf")

    started = time.monotonic()
    snap, prep, _, sha = await scan(repo, RacingRunner(swap), policy)
    assert time.monotonic() - started < 5 and sha  # grep -D skip, tar opens without blocking
    assert prep.meta[str(etc / "hosts")].sha256 == hashlib.sha256(b"changed too\n").hexdigest()
    assert any("app.conf vanished before it could be fetched" in w for w in snap.warnings)


class RacingRunner(LocalRunner):
    """Runs ``between()`` after the manifest and before the fetch; ``blind_host``: the fetch's
    content rules match nothing on the host (as if a file changed between its grep and tar)."""

    def __init__(self, between: Callable[[], None], *, blind_host: bool = False) -> None:
        super().__init__()
        self.between = between
        self.blind_host = blind_host

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> Result:
        if script == FETCH_SCRIPT:
            self.between()
            if self.blind_host:
                args = [args[0], "NEVER-MATCHES-d41d8", *args[2:]]
        res = await super().run_script(script, args=args, stdin_after=stdin_after, timeout=timeout)
        if script == MANIFEST_SCRIPT:
            assert res.exit_status == 0
        return res


async def test_file_swapped_for_a_huge_one_before_the_fetch_is_not_read(etc: Path, repo: HistoryRepo) -> None:
    policy = PathPolicy(roots=(str(etc),))
    await scan(repo, LocalRunner(), policy)
    (etc / "hosts").write_text("changed\n")
    (etc / "app" / "app.conf").write_text("changed too\n")

    def swap() -> None:
        (etc / "app" / "app.conf").unlink()
        with open(etc / "app" / "app.conf", "wb") as f:
            f.truncate(40 << 30)

    started = time.monotonic()
    snap, prep, _, sha = await scan(repo, RacingRunner(swap), policy)
    assert time.monotonic() - started < 5 and sha
    assert prep.meta[str(etc / "hosts")].sha256 == hashlib.sha256(b"changed\n").hexdigest()
    assert any("app.conf could not be fetched" in w for w in snap.warnings), snap.warnings
    assert prep.meta[str(etc / "app" / "app.conf")].stored == "unreadable"


# ---------------------------------------------------------------- becoming secret, and back


async def test_file_becoming_secret_and_back(etc: Path, repo: HistoryRepo) -> None:
    policy = PathPolicy(roots=(str(etc),))
    pem = etc / "app" / "server.pem"
    pem.write_text("# placeholder, plain\n")
    await scan(repo, LocalRunner(), policy)
    assert b"placeholder" in all_objects(repo.path)  # plain content: recorded

    # becomes secret (a key pasted in): the host's content scan stops the fetch
    pem.write_bytes(b"# placeholder, plain\n" + KEY)
    snap, prep, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and snap.fetched == 0 and str(pem) in snap.secrets
    assert prep.meta[str(pem)].stored == "secret"
    assert f"  {pem} (secret (content hidden): now recorded by keyed hash only; its content holds" in msg
    assert "secret" not in (await repo.diff(sha, "local"))  # the file is left out of the diff
    assert CANARY not in all_objects(repo.path)

    # changes while secret: a new keyed hash, never content
    pem.write_bytes(KEY + b"# rotated\n")
    _, prep, msg, sha = await scan(repo, LocalRunner(), policy)
    assert (
        sha
        and prep.changes.secret_changed == (str(pem),)
        and f"  {pem} (secret (content hidden); its content holds" in msg
    )

    # becomes secret between the manifest and the fetch: the fetch's own scan on the host sees it
    conf = etc / "app" / "app.conf"
    conf.write_text("port = 81\n")
    snap, prep, msg, sha = await scan(
        repo, RacingRunner(lambda: conf.write_bytes(b"port = 81\n" + KEY)), policy
    )
    assert snap.content_secrets[str(conf)] == "secret content" and snap.fetched == 0
    assert (
        prep.meta[str(conf)].stored == "secret" and "its content holds a private key, a password hash" in msg
    )
    # unchanged since: not fetched again (its keyed hash says so), still secret, no commit (the
    # racing scan hashed what the manifest saw: the next scan records the key's own hash once)
    await scan(repo, LocalRunner(), policy)
    runner = LocalRunner()
    snap, prep, msg, sha = await scan(repo, runner, policy)
    assert sha is None and len(runner.calls) == 1 and str(conf) in snap.secrets, (
        len(runner.calls),
        snap.fetched,
        snap.warnings,
        dict(snap.content_secrets),
    )

    # and if the content changed after the host's scan (between grep and tar): the fetched
    # bytes are checked again before anything records them
    conf.write_text("port = 82\n")
    racing = RacingRunner(lambda: conf.write_bytes(b"port = 82\n" + KEY), blind_host=True)
    snap, prep, msg, sha = await scan(repo, racing, policy)
    assert snap.content_secrets[str(conf)] == "private key" and str(conf) not in snap.contents
    assert prep.meta[str(conf)].stored == "secret" and "its content holds a private key)" in msg

    # and back: plain again, recorded again
    pem.write_text("# key moved to the HSM\n")
    _, prep, msg, sha = await scan(repo, LocalRunner(), policy)
    assert sha and prep.meta[str(pem)] == Recorded(
        "file", prep.meta[str(pem)].mode, prep.meta[str(pem)].owner, prep.meta[str(pem)].group,
        sha256=hashlib.sha256(b"# key moved to the HSM\n").hexdigest(),
    )  # fmt: skip
    assert "no longer secret: its content is recorded from now on" in msg
    assert git(repo.path, "show", f"main:hosts/local{pem}") == "# key moved to the HSM\n"
    assert CANARY not in all_objects(repo.path)
    assert CANARY.decode() not in git(repo.path, "log", "-p", "--all")
