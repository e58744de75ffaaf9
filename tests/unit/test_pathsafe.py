# ruff: noqa: E501 - expected messages are long
"""The path-safety helper (reconciler/host/pathsafe_helper.pl) run for real, as root, in a temp dir,
against a real non-root user (``nobody``): links in the way, directories another user owns,
temps and targets swapped for links, hard links, FIFOs, leftovers, the policy's edge cases;
and the Python side of the same policy on ``find`` records."""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.host import pathsafe
from reconciler.host.pathsafe import STRICT, Batch, Rule, Status
from reconciler.host.script import split_sections
from reconciler.kinds.filestate import FIND_FMT, parse_find_records, parse_sha256

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the helper chowns files: run as root")

NOBODY = pwd.getpwnam("nobody")
TOKEN = "a1b2c3d4e5f6"


@dataclass
class Ran:
    rc: int
    stdout: bytes
    stderr: str
    marker: str

    def statuses(self) -> list[Status]:
        return pathsafe.statuses(self.stdout, self.marker)

    def tags(self, idx: int = 0) -> list[tuple[str, str]]:
        """(tag, text) of one operation's status lines; a staged file's ``ok dev:ino`` as ``ok``."""
        out = []
        for s in self.statuses():
            if s.idx == idx:
                out.append((s.tag, "ok" if s.tag == "S" and s.text.startswith("ok ") else s.text))
        return out


def run(batch: Batch) -> Ran:
    """Run the helper's source as it is (``use strict``, ``use warnings``: the copy sent to hosts
    drops both, see ``pathsafe.HELPER``; the other tests run that copy): no warning allowed."""
    marker = secrets.token_hex(16)
    argv = [pathsafe.PERL, "-e", pathsafe.HELPER_SOURCE, "--", "stdin"]
    res = subprocess.run(argv, input=batch.payload(marker), capture_output=True, timeout=60, check=False)
    stderr = res.stderr.decode(errors="replace")
    assert " at -e line " not in stderr or "reconciler pathsafe:" in stderr, stderr
    return Ran(res.returncode, res.stdout, stderr, marker)


def batch() -> Batch:
    b = Batch()
    b.token(TOKEN)
    return b


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root-owned 0755 directory whose ancestors are root's (``/tmp`` is sticky, accepted above)."""
    os.chmod(tmp_path, 0o755)
    return tmp_path


@pytest.fixture
def canary(root: Path) -> Path:
    """A root-only file the attacks below aim at (like /etc/shadow)."""
    d = root / "secret"
    d.mkdir()
    c = d / "shadow"
    c.write_text("root:$6$canary:19000:0:99999:7:::\n")
    os.chmod(c, 0o640)
    return c


def untouched(c: Path) -> bool:
    st = c.lstat()
    return st.st_uid == 0 and st.st_gid == 0 and (st.st_mode & 0o7777) == 0o640 and "canary" in c.read_text()


def home(root: Path) -> Path:
    """A directory the non-root user owns (like /home/deploy)."""
    h = root / "home"
    h.mkdir()
    os.chown(h, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(h, 0o755)
    return h


# ---------------------------------------------------------------- writes


def test_stage_then_swap_sets_content_owner_mode_on_the_open_file(root: Path) -> None:
    target = root / "etc" / "app" / "app.ini"  # directories created (root, 0755)
    b = batch()
    b.stage(0, str(target), STRICT, content=b"v1\n", mode=0o640, owner="nobody", group="nogroup")
    b.gate()
    b.swap(0, str(target), STRICT, backup=False, link_target=None, owner="nobody")
    r = run(b)
    assert r.rc == 0, r.stderr
    assert r.tags() == [("S", "ok"), ("OK", "")]
    st = target.stat()
    assert target.read_bytes() == b"v1\n" and (st.st_mode & 0o7777) == 0o640
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert sorted(p.name for p in target.parent.iterdir()) == ["app.ini"]  # no temp left
    assert (target.parent.stat().st_mode & 0o7777, target.parent.stat().st_uid) == (0o755, 0)


def test_symlinked_parent_is_refused_and_nothing_lands_at_its_target(root: Path, canary: Path) -> None:
    h = home(root)
    (h / ".ssh").symlink_to(canary.parent)  # ~/.ssh -> the root-only directory
    keys = h / ".ssh" / "authorized_keys"
    b = batch()
    b.stage(
        0, str(keys), Rule(str(h), "nobody"), content=b"ssh-ed25519 AAAA\n", owner="nobody", group="nogroup"
    )
    b.gate()
    b.swap(0, str(keys), Rule(str(h), "nobody"), backup=False, link_target=None, owner="nobody")
    r = run(b)
    assert r.tags()[0] == ("S", f"fail refused: {h}/.ssh is a symlink to {canary.parent}")
    assert any(s.tag == "GATE" for s in r.statuses())
    assert sorted(p.name for p in canary.parent.iterdir()) == ["shadow"] and untouched(canary)


def test_a_directory_of_another_user_is_refused_unless_the_fleet_says_so(root: Path) -> None:
    h = home(root)
    path = str(h / "app.ini")
    b = batch()
    b.stage(0, path, STRICT, content=b"x\n")
    r = run(b)
    assert r.tags() == [("S", f"fail refused: {h} is writable by uid {NOBODY.pw_uid} (nobody)")]
    assert not Path(path).exists()
    b = batch()
    b.stage(0, path, Rule(str(h), "nobody"), content=b"x\n", owner="nobody", group="nogroup")
    b.swap(0, path, Rule(str(h), "nobody"), backup=False, link_target=None, owner="nobody")
    assert run(b).tags() == [("S", "ok"), ("OK", "")]
    # ... but only that user: another one controlling it is still refused
    os.chown(h, 1, 1)  # daemon
    b = batch()
    b.stage(0, path, Rule(str(h), "nobody"), content=b"y\n", owner="nobody", group="nogroup")
    assert "is writable by uid 1 (daemon) (only nobody may control it" in run(b).tags()[0][1]


@pytest.mark.parametrize(
    ("mode", "where", "why"),
    [
        (0o775, "parent", "is writable by group root"),
        (0o757, "parent", "is writable by every user (mode 0757)"),
        (0o1777, "parent", "is writable by every user (mode 1777)"),
        (0o1777, "above", None),  # a root-owned sticky dir (like /tmp) above the parent is fine
        (0o777, "above", "is writable by every user (mode 0777)"),
    ],
)
def test_group_or_other_writable_directories(root: Path, mode: int, where: str, why: str | None) -> None:
    d = root / "d"
    d.mkdir()
    os.chmod(d, mode)
    path = d / "f" if where == "parent" else d / "sub" / "f"
    b = batch()
    b.stage(0, str(path), STRICT, content=b"x\n")
    tags = run(b).tags()
    if why is None:
        assert tags == [("S", "ok")]
    else:
        assert tags == [("S", f"fail refused: {d} {why}")]


def test_unknown_owner_is_named(root: Path) -> None:
    b = batch()
    b.stage(0, str(root / "f"), STRICT, content=b"x\n", owner="nosuchuser")
    b.stage(1, str(root / "g"), STRICT, content=b"x\n", group="nosuchgroup")
    r = run(b)
    assert r.tags(0) == [("S", "fail unknown user nosuchuser on this host")]
    assert r.tags(1) == [("S", "fail unknown group nosuchgroup on this host")]
    assert sorted(p.name for p in root.iterdir()) == []


def test_staged_temp_swapped_for_a_link_is_not_swapped(root: Path, canary: Path) -> None:
    h = home(root)
    rule = Rule(str(h), "nobody")
    path = h / "app.ini"
    path.write_text("old\n")
    b = batch()
    b.stage(0, str(path), rule, content=b"new\n", mode=0o644, owner="nobody", group="nogroup")
    assert run(b).tags() == [("S", "ok")]
    tmp = h / f".app.ini.reconciler-{TOKEN}"
    tmp.unlink()
    tmp.symlink_to(canary)  # the attacker's swap between stage and swap
    b = batch()
    b.swap(0, str(path), rule, backup=True, link_target=None, owner="nobody")
    tags = run(b).tags()
    assert tags == [
        (
            "F",
            f"the staged copy {h}/.app.ini.reconciler-{TOKEN} was replaced (a symlink to {canary}): not swapped",
        )
    ]
    assert path.read_text() == "old\n" and not tmp.exists() and not tmp.is_symlink()
    assert untouched(canary)


def test_a_temp_replaced_by_another_regular_file_of_the_owner_is_not_swapped(root: Path) -> None:
    """The user who controls the directory (and owns the file) puts their own file under the
    temp's name: the swap knows the staged inode and refuses it. (Were the inode number reused,
    the rename would only do what that user can do anyway: rename their file over their own
    file, in their own directory; a file of another owner is refused by its owner.)"""
    h = home(root)
    rule = Rule(str(h), "nobody")
    path = h / "authorized_keys"
    b = batch()
    b.stage(0, str(path), rule, content=b"key\n", owner="nobody", group="nogroup")
    r = run(b)
    (ino,) = [s.text.removeprefix("ok ") for s in r.statuses() if s.tag == "S"]
    tmp = h / f".authorized_keys.reconciler-{TOKEN}"
    theirs = h / "theirs"
    theirs.write_text("attacker key\n")
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)
    theirs.rename(tmp)
    b = batch()
    b.swap(0, str(path), rule, backup=False, link_target=None, owner="nobody", expect=ino)
    assert run(b).tags() == [
        (
            "F",
            f"the staged copy {h}/.authorized_keys.reconciler-{TOKEN} was replaced (not the staged file): not swapped",
        )
    ]
    assert not path.exists() and not tmp.exists()


def test_chown_and_chmod_never_follow_a_link_or_a_hard_link(root: Path, canary: Path) -> None:
    h = home(root)
    rule = Rule(str(h), "nobody")
    ini = h / "app.ini"
    ini.symlink_to(canary)
    b = batch()
    b.meta(0, str(ini), rule, chown=True, mode=0o644, owner="nobody", group="nogroup")
    b.meta(1, str(ini), rule, chown=False, mode=0o644, owner="nobody", group="nogroup")
    r = run(b)
    assert r.tags(0) == [("F", f"{ini} is a symlink now (to {canary}): not changed")]
    assert r.tags(1)[0][0] == "F"
    ini.unlink()
    os.link(canary, ini)  # a hard link (possible where fs.protected_hardlinks is 0)
    r = run(b)
    assert "hard links in a directory another user controls" in r.tags(0)[0][1]
    assert untouched(canary)


def test_chown_of_a_regular_file_sets_owner_then_mode(root: Path) -> None:
    f = root / "app.ini"
    f.write_text("x\n")
    os.chmod(f, 0o4755)
    b = batch()
    b.meta(0, str(f), STRICT, chown=True, mode=0o4755, owner="nobody", group="nogroup")
    assert run(b).tags() == [("OK", "")]
    st = f.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o4755)


def test_delete_through_a_symlinked_directory_deletes_nothing(root: Path, canary: Path) -> None:
    conf = root / "conf.d"
    conf.symlink_to(canary.parent)
    b = batch()
    b.delete(0, str(conf / "shadow"), STRICT, backup=True)
    b.delete(1, str(root / "gone" / "x"), STRICT, backup=False)
    r = run(b)
    assert r.tags(0) == [("F", f"not deleted: {conf} is a symlink to {canary.parent}")]
    assert r.tags(1) == [("OK", "already gone")]
    assert untouched(canary) and sorted(p.name for p in canary.parent.iterdir()) == ["shadow"]


def test_backup_restore_and_leftover_cleanup(root: Path, canary: Path) -> None:
    f = root / "a.conf"
    f.write_text("old\n")
    b = batch()
    b.stage(0, str(f), STRICT, content=b"new\n")
    b.swap(0, str(f), STRICT, backup=True, link_target=None, owner="root")
    r = run(b)
    assert r.tags() == [("S", "ok"), ("B", ""), ("OK", "")]
    assert f.read_text() == "new\n" and (root / f".a.conf.reconciler-bak-{TOKEN}").read_text() == "old\n"
    b = batch()
    b.restore(0, str(f), STRICT, had_backup=True)
    assert run(b).tags() == [("R", "")]
    assert f.read_text() == "old\n"
    # leftovers of interrupted applies: removed, never followed; other dotfiles kept
    (root / ".x.conf.reconciler-0badc0de").write_text("stale temp\n")
    (root / ".a.conf.reconciler-bak-0badc0de").symlink_to(canary)
    (root / f".a.conf.reconciler-{TOKEN}").write_text("this run's\n")
    (root / ".hidden").write_text("kept\n")
    b = batch()
    b.clean(str(f), STRICT, keep_token=True)
    run(b)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".hidden", f".a.conf.reconciler-{TOKEN}", "a.conf", "secret"]
    )
    b = batch()
    b.clean(str(f), STRICT, keep_token=False)
    run(b)
    assert sorted(p.name for p in root.iterdir()) == [".hidden", "a.conf", "secret"] and untouched(canary)


def test_journal_written_atomically_and_cleared(root: Path) -> None:
    j = root / "state" / "pending-reloads"
    b = batch()
    b.journal(str(j), "apache2\ncharon\n")
    assert run(b).rc == 0 and j.read_text() == "apache2\ncharon\n"
    b = batch()
    b.journal(str(j), "")
    assert run(b).rc == 0 and not j.exists()
    (root / "bad").symlink_to(root / "state")
    b = batch()
    b.journal(str(root / "bad" / "pending-reloads"), "x\n")
    r = run(b)
    assert r.rc == 20 and r.tags() == [
        (
            "J",
            f"cannot write the pending-reloads journal {root}/bad/pending-reloads: {root}/bad is a symlink to {root}/state",
        )
    ]


# ---------------------------------------------------------------- reads


def test_stat_and_hash_read_only_what_was_opened_safely(root: Path, canary: Path) -> None:
    h = home(root)
    rule = Rule(str(h), "nobody")
    (h / "ok.txt").write_text("hello\n")
    (h / "lnk").symlink_to(canary)
    os.mkfifo(h / "fifo")  # never opened (would block a reader)
    (h / "sub").symlink_to(canary.parent)
    os.link(canary, h / "hard")
    b = Batch()
    for name in ("ok.txt", "lnk", "fifo", "sub/shadow", "hard", "missing"):
        b.stat(str(h / name), rule, hash_it=True)
    b.stat(str(root / "other" / "x"), STRICT, hash_it=True)
    b.flush("safe")
    r = run(b)
    assert r.rc == 0, r.stderr
    secs = split_sections(r.stdout, nonce=r.marker)
    recs = parse_find_records(secs["safe.st"].body)
    hashes = parse_sha256(secs["safe.hs"].body)
    assert recs[str(h / "ok.txt")].kind == "file" and recs[str(h / "ok.txt")].uid == 0
    assert hashes == {str(h / "ok.txt"): hashlib.sha256(b"hello\n").hexdigest()}
    assert recs[str(h / "lnk")].kind == "link" and recs[str(h / "lnk")].link_target == str(canary)
    assert recs[str(h / "fifo")].kind == "other"
    assert recs[str(h / "sub/shadow")].refused == f"{h}/sub is a symlink to {canary.parent}"
    assert "2 hard links" in (recs[str(h / "hard")].refused or "")
    assert str(h / "missing") not in recs and str(root / "other" / "x") not in recs


def test_read_for_diffs(root: Path, canary: Path) -> None:
    (root / "a.txt").write_bytes(b"line\n" * 10)
    (root / "l").symlink_to(canary)
    b = Batch()
    b.read("c0", str(root / "a.txt"), STRICT, 12)
    b.read("c1", str(root / "l"), STRICT, 100)
    r = run(b)
    secs = split_sections(r.stdout, r.stderr.encode(), nonce=r.marker)
    assert secs["c0"].body == b"line\nline\nli" and secs["c0"].exit_status == 0
    assert secs["c1"].exit_status == 3 and secs["c1"].body == b"" and "is a symlink" in secs["c1"].stderr


def test_args_mode_and_bad_input(root: Path) -> None:
    (root / "a").write_text("a\n")
    b = Batch()
    b.stat(str(root / "a"), STRICT, hash_it=False)
    b.flush("x")
    res = subprocess.run(
        [*pathsafe.command()[:-1], "args", *b.args()],
        env={**os.environ, "RCL_N": "ab" * 8},
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0 and str(root / "a").encode() in res.stdout
    for bad in (b"1\nX", b"5\nstat\n"):
        res = subprocess.run(
            pathsafe.command(), input=b"ab" * 8 + b"\n" + bad, capture_output=True, check=False
        )
        assert res.returncode != 0 and b"reconciler pathsafe:" in res.stderr
    b = Batch()
    b.stat("/a\0b", STRICT, hash_it=False)
    with pytest.raises(ValueError):
        b.args()


# ---------------------------------------------------------------- the policy on find records


@pytest.mark.parametrize(
    "setup",
    ["fine", "link", "user", "group", "other", "sticky-parent", "sticky-above", "file"],
)
def test_python_policy_agrees_with_the_helper(root: Path, setup: str) -> None:
    d = root / "d"
    if setup == "link":
        (root / "real").mkdir()
        d.symlink_to(root / "real")
    elif setup == "file":
        d.write_text("not a dir\n")
    else:
        d.mkdir()
        modes = {"group": 0o775, "other": 0o777, "sticky-parent": 0o1777, "sticky-above": 0o1777}
        os.chmod(d, modes.get(setup, 0o755))
        if setup == "user":
            os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    path = str(d / "sub" / "f") if setup == "sticky-above" else str(d / "f")
    if setup == "sticky-above":
        (d / "sub").mkdir()
    dirs = pathsafe.ancestors(path)
    out = subprocess.run(
        ["find", *dirs, "-maxdepth", "0", "-printf", FIND_FMT], capture_output=True, check=False
    ).stdout
    py = pathsafe.refusal(path, parse_find_records(out))
    b = batch()
    b.stage(0, path, STRICT, content=b"x\n")
    helper = run(b).tags()[0][1]
    if setup in ("fine", "sticky-above"):
        assert py is None and helper == "ok"
    else:
        assert py is not None and helper.startswith("fail refused: ")
        assert py.split(" (")[0] == helper.removeprefix("fail refused: ").split(" (")[0]
