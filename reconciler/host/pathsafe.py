"""Path safety on the host: file operations that never follow a link, and the directory policy.

The reconciler is root on every host; a managed path whose directories another user can
change is an attack surface (``~/.ssh -> /root/.ssh``; a temp or a target swapped for a link to
/etc/shadow between observation and change). Every write, rename, chown, chmod, mkdir, delete,
backup, restore and read of a managed path therefore goes through ``pathsafe_helper.pl``, a
small Perl program shipped with each command (``perl -e``: perl-base is Essential on Debian and
has Fcntl; Python is not guaranteed on hosts). It resolves the path one component at a time
(``O_DIRECTORY|O_NOFOLLOW`` + fchdir, so the parent directory is pinned by inode), creates temps
with ``O_CREAT|O_EXCL|O_NOFOLLOW``, sets owner and mode on the open file (fchown/fchmod), renames
and links by relative name inside the pinned directory, and hashes files it opened itself
(``sha256sum /dev/fd/N``).

The policy (the same in the helper and in ``refusal`` below, which judges the observation's
``find`` records): every directory above a managed path is a real directory (not a link), owned
by root and not group/other-writable; a root-owned sticky directory (``/tmp``) is accepted above
the parent, never as the parent. A fleet may say that a non-root user controls a directory and
those below it on a file's path (``ManagedFile.controlled_dir``, a ``Rule`` here): those may then
belong to that user, and the file is observed and written only through the helper.

The no-op observation stays lean: paths under root-only directories are read by the
observation's one ``find`` (which also prints their ancestors, judged here) and one ``sha256sum``
(after shell-builtin checks that no ancestor is a link or another user's); only paths under a
user-controlled directory cost a helper run.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources

from reconciler.host.script import numbered, split_sections
from reconciler.kinds.observed import FileState

PERL = "perl"


def _compact(source: str) -> str:
    """The helper as sent in argv: comment lines and indentation dropped (a third smaller), and
    ``use strict``/``use warnings`` (a fifth of perl's start-up; the tests run the source with
    them, see tests/unit/test_pathsafe.py)."""
    out = []
    for line in source.splitlines():
        s = line.strip()
        if s and not s.startswith(("#", "use strict;", "use warnings;")):
            out.append(s)
    return "\n".join(out) + "\n"


HELPER_SOURCE = resources.files("reconciler.host").joinpath("pathsafe_helper.pl").read_text(encoding="utf-8")
HELPER = _compact(HELPER_SOURCE)

TEMP_MARK = re.compile(r"\A\..+\.reconciler-(?:bak-)?[0-9a-f]+\Z", re.S)


@dataclass(frozen=True)
class Rule:
    """Who may control the directories above a path: ``top`` and the directories below it on
    the path may belong to ``user`` (the fleet said so); every other one must be root's alone.
    The default rule (no ``top``) is root's alone everywhere."""

    top: str = ""
    user: str = ""

    @property
    def strict(self) -> bool:
        return not self.top

    def fields(self) -> tuple[str, str]:
        return (self.top, self.user) if self.top else ("", "")


STRICT = Rule()


def rule_of(resource: object) -> Rule:
    """The rule a FileResource/LinkResource declares (``controlled_dir``/``controlled_by``)."""
    top = getattr(resource, "controlled_dir", None)
    user = getattr(resource, "controlled_by", None)
    if top and user:
        return Rule(top, user)
    return STRICT


def command() -> list[str]:
    """argv of one helper run reading its marker and operations on stdin (``Batch.payload``)."""
    return [PERL, "-e", HELPER, "--", "stdin"]


# ---------------------------------------------------------------- building a run


@dataclass
class Batch:
    """The operations of one helper run, in order (see pathsafe_helper.pl for each one)."""

    fields: list[bytes] = field(default_factory=list)

    def _op(self, name: str, *values: str | bytes | int) -> None:
        self.fields.append(name.encode())
        for v in values:
            self.fields.append(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape"))

    def token(self, token: str) -> None:
        self._op("token", token)

    def gate(self) -> None:
        """Stop here (swap nothing) if any stage operation before it failed."""
        self._op("gate")

    def stat(self, path: str, rule: Rule, *, hash_it: bool) -> None:
        self._op("stat", path, *rule.fields(), "1" if hash_it else "0")

    def flush(self, section: str) -> None:
        """Print the records of the stat operations so far (section ``<id>.st``) and their
        hashes (``<id>.hs``)."""
        self._op("flush", section)

    def read(self, section: str, path: str, rule: Rule, limit: int) -> None:
        self._op("read", section, path, *rule.fields(), limit)

    def stage(
        self,
        idx: int,
        path: str,
        rule: Rule,
        *,
        link_target: str | None = None,
        content: bytes = b"",
        mode: int = 0o644,
        owner: str = "root",
        group: str = "root",
        validation_copy: str = "",
    ) -> None:
        kind, data = ("l", link_target.encode()) if link_target is not None else ("f", content)
        self._op("stage", idx, path, *rule.fields(), kind, f"{mode:04o}", owner, group, data, validation_copy)

    def swap(
        self,
        idx: int,
        path: str,
        rule: Rule,
        *,
        backup: bool,
        link_target: str | None,
        owner: str,
        expect: str = "",
    ) -> None:
        """``expect``: the staged temp's ``dev:ino`` (from the stage run's answer) when staged by
        another run: anything else found under the temp's name is refused."""
        kind = "l" if link_target is not None else "f"
        self._op(
            "swap", idx, path, *rule.fields(), "1" if backup else "0", kind, owner, link_target or "", expect
        )

    def meta(
        self, idx: int, path: str, rule: Rule, *, chown: bool, mode: int, owner: str, group: str
    ) -> None:
        self._op(
            "meta", idx, path, *rule.fields(), "chown" if chown else "chmod", f"{mode:04o}", owner, group
        )

    def delete(self, idx: int, path: str, rule: Rule, *, backup: bool) -> None:
        self._op("delete", idx, path, *rule.fields(), "1" if backup else "0")

    def restore(self, idx: int, path: str, rule: Rule, *, had_backup: bool) -> None:
        self._op("restore", idx, path, *rule.fields(), "1" if had_backup else "0")

    def unstage(self, path: str, rule: Rule) -> None:
        self._op("unstage", path, *rule.fields())

    def clean(self, path: str, rule: Rule, *, keep_token: bool) -> None:
        """Remove leftovers (``.NAME.reconciler-*`` temps and backups) from ``path``'s directory;
        ``keep_token``: not this run's own."""
        self._op("clean", path, *rule.fields(), "1" if keep_token else "0")

    def journal(self, path: str, content: str) -> None:
        """Write (temp + rename; "" removes) a root-only file; the run stops (exit 20) if it fails."""
        self._op("journal", path, content)

    def payload(self, marker: str) -> bytes:
        """stdin of ``command()``: the marker line, then every field as ``<length>\\n<bytes>``."""
        out = [marker.encode() + b"\n"]
        for f in self.fields:
            out.append(b"%d\n" % len(f))
            out.append(f)
        return b"".join(out)

    def args(self) -> list[str]:
        """The same operations as argv (``perl -e HELPER -- args ...``; the marker from $RCL_N)."""
        out = []
        for f in self.fields:
            if b"\0" in f:
                raise ValueError("a NUL byte cannot travel as an argument")
            out.append(f.decode("utf-8", "surrogateescape"))
        return out

    def __bool__(self) -> bool:
        return bool(self.fields)


# ---------------------------------------------------------------- reading its answer


@dataclass(frozen=True)
class Status:
    tag: str  # S (staged), OK, F (failed), B (backed up), R/RF (restored / not), J, GATE
    idx: int
    text: str = ""


def statuses(stdout: bytes, marker: str) -> list[Status]:
    """The helper's statuses (sections ``status.<n>``: ``TAG IDX text``), in order."""
    out = []
    for line in numbered(split_sections(stdout, nonce=marker), "status"):
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        out.append(Status(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return out


# ---------------------------------------------------------------- the policy on find records


def ancestors(path: str) -> tuple[str, ...]:
    """The directories above an absolute path, from ``/`` down to its parent."""
    out = ["/"]
    parts = path.strip("/").split("/")[:-1]
    cur = ""
    for p in parts:
        cur = f"{cur}/{p}"
        out.append(cur)
    return tuple(out)


def all_ancestors(paths: Iterable[str]) -> tuple[str, ...]:
    """The directories above every one of ``paths``, each once (paths share directories)."""
    seen: dict[str, None] = {}
    for parent in dict.fromkeys(p.rpartition("/")[0] for p in paths):
        for a in ancestors(parent + "/x"):
            seen[a] = None
    return tuple(seen)


def dir_refusal(d: str, st: FileState, *, is_parent: bool) -> str | None:
    """Why a directory above a managed path is not root's alone (None if it is)."""
    if st.kind == "link":
        return f"{d} is a symlink to {st.link_target}"
    if st.kind != "dir":
        return f"{d} is not a directory"
    mode = st.mode or 0
    if st.uid is None or st.uid != 0:
        how = "is writable by" if mode & 0o200 else "is owned by"
        return f"{d} {how} uid {st.uid if st.uid is not None else '?'} ({st.owner})"
    sticky_ok = bool(mode & 0o1000) and not is_parent
    if mode & 0o002 and not sticky_ok:
        return f"{d} is writable by every user (mode {mode:04o})"
    if mode & 0o020 and not sticky_ok:
        return f"{d} is writable by group {st.group}"
    return None


def refusal(path: str, dirs: Mapping[str, FileState], *, upto: str | None = None) -> str | None:
    """Why ``path`` must not be touched by path name, judged from the ``find`` records of its
    directories (None: every one is root's alone, or one is missing: the path is absent).
    ``upto``: judge only the directories down to this one (files found under an owned dir)."""
    chain = ancestors(path)
    if upto is not None:
        chain = tuple(a for a in chain if a == upto or not a.startswith(upto.rstrip("/") + "/"))
    parent = posixpath.dirname(path)
    for d in chain:
        st = dirs.get(d)
        if st is None or not st.exists:
            return None
        why = dir_refusal(d, st, is_parent=d == parent)
        if why:
            return why
    return None
