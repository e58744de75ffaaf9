"""The /etc history repository: one git repo, every host under ``hosts/<host>/<path>``.

Layout of a commit's tree::

    hosts/<host>/etc/hosts          file content (mode 100644, or 100755 if executable)
    hosts/<host>/etc/alternatives/x symlinks as git symlinks (120000, blob = target)
    hosts/<host>/etc/shadow         a marker: "secret, content never stored" + a keyed hash
    hosts/<host>/etc/big.img        a marker: a large file's size, mtime and the sha256 of its
                                    first and last 64 KiB (its content is never read in full)
    meta/<host>.json                one line per path: kind, mode, owner, group, sha256 (or the
                                    keyed hash for a secret), link target

Paths are the host's bytes: tree entries are written from ``str`` paths encoded with
``surrogateescape``, so a name that is not UTF-8 (``bad\xffname.conf``) is recorded like any
other; commit messages and mail show it escaped (``snapshot.display_path``). A name git itself
refuses in a tree (a ``.GIT`` component, NTFS aliases of ``.git``, a symlink named
``.gitmodules``) is recorded in the metadata only, by sha256, with no blob.

The repository is bare (nothing is ever written into a work tree, so no host path can escape it),
created mode 0700, and written only with git plumbing through a private temporary index:
``hash-object`` -> ``update-index --index-info`` -> ``write-tree`` -> ``commit-tree`` ->
``update-ref NEW OLD``. A host commit is made only when the new tree differs from HEAD's tree,
so recording the same state twice (a retried or restarted scan) never makes a second commit.

Secrets are never stored: for a secret file the repo holds only
``HMAC-SHA256(key, path NUL sha256)`` where the key is 32 random bytes kept in the state dir
(``history.key``, mode 0600), never in git. Without that key the hash cannot be brute-forced.

Any git failure (a stale ``index.lock`` or ref lock, a failed commit) raises ``HistoryError``:
never "no drift".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets as _secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.drift.snapshot import LARGE_NOTE, Entry, Snapshot, content_id, display_path, path_bytes
from reconciler.errors import ReconcilerError
from reconciler.log import get_logger

log = get_logger(__name__)

BRANCH = "main"
REF = f"refs/heads/{BRANCH}"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
ZERO = "0" * 40
DEFAULT_AUTHOR = ("reconciler", "reconciler@localhost")
SECRET_MARKER_HEAD = b"# reconciler: secret file, content never stored\n"
SECRET_NOTE = "secret (content hidden)"  # noqa: S105 (a label, not a password)
# how a file's content is held: "content" (a blob), "secret" (a keyed hash), "large" (size,
# mtime, hash of its ends), "unreadable", "hash-only" (a name git refuses: sha256, no blob);
# "too-large" (full sha256, no blob) was written by earlier versions
_LARGE = ("large", "too-large")
_LOCK_FILES = ("index.lock", "HEAD.lock", f"{REF}.lock", "packed-refs.lock", "config.lock")


class HistoryError(ReconcilerError):
    """The history repo could not be read or written. Loud: never treated as "no drift"."""


@dataclass(frozen=True)
class Recorded:
    """What the history holds for one path (one line of meta/<host>.json)."""

    kind: str
    mode: int
    owner: str
    group: str
    sha256: str | None = None  # non-secret regular files
    secret: str | None = None  # "hmac-sha256:<hex>" for secrets
    target: str | None = None
    stored: str = "content"  # "content", "secret", "large", "unreadable", "hash-only", "none"
    size: int | None = None  # large files
    mtime: float | None = None  # large files
    ends_sha256: str | None = None  # large files: sha256 of the first and last 64 KiB

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "kind": self.kind,
            "mode": f"{self.mode:04o}",
            "owner": self.owner,
            "group": self.group,
        }
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.secret is not None:
            d["secret"] = self.secret
        if self.target is not None:
            d["target"] = self.target
        if self.stored != "content":
            d["stored"] = self.stored
        if self.size is not None:
            d["size"] = self.size
        if self.mtime is not None:
            d["mtime"] = self.mtime
        if self.ends_sha256 is not None:
            d["ends_sha256"] = self.ends_sha256
        return d

    @staticmethod
    def from_json(d: Mapping[str, object]) -> Recorded:
        def opt(k: str) -> str | None:
            v = d.get(k)
            return None if v is None else str(v)

        return Recorded(
            kind=str(d["kind"]),
            mode=int(str(d["mode"]), 8),
            owner=str(d["owner"]),
            group=str(d["group"]),
            sha256=opt("sha256"),
            secret=opt("secret"),
            target=opt("target"),
            stored=str(d.get("stored", "content")),
            size=None if d.get("size") is None else int(str(d["size"])),
            mtime=None if d.get("mtime") is None else float(str(d["mtime"])),
            ends_sha256=opt("ends_sha256"),
        )


@dataclass(frozen=True)
class Change:
    path: str
    what: str  # "new", "removed", "changed", "secret-changed", "meta", "type"
    detail: str = ""  # e.g. "mode 0644 -> 0600"; never content


@dataclass(frozen=True)
class ChangeSet:
    host: str
    changes: tuple[Change, ...] = ()

    def paths(self, *whats: str) -> tuple[str, ...]:
        return tuple(c.path for c in self.changes if c.what in whats)

    @property
    def new(self) -> tuple[str, ...]:
        return self.paths("new")

    @property
    def removed(self) -> tuple[str, ...]:
        return self.paths("removed")

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.paths("changed", "secret-changed", "type", "meta")))

    @property
    def secret_changed(self) -> tuple[str, ...]:
        return self.paths("secret-changed")

    def __bool__(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class Prepared:
    """A snapshot turned into what the history will hold, before it is committed."""

    host: str
    meta: Mapping[str, Recorded]
    previous: Mapping[str, Recorded]
    changes: ChangeSet
    blobs: Mapping[str, tuple[str, bytes | None]] = field(default_factory=dict)  # (git mode, data)


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    parent: str | None
    host: str
    message: str


# ---------------------------------------------------------------- pure parts


def encode_meta(meta: Mapping[str, Recorded]) -> bytes:
    """One path per line, sorted, so diffs of the metadata are readable."""
    lines = [json.dumps(p) + ": " + json.dumps(meta[p].to_json(), sort_keys=True) for p in sorted(meta)]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def decode_meta(data: bytes) -> dict[str, Recorded]:
    try:
        raw = json.loads(data)
        return {str(p): Recorded.from_json(v) for p, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HistoryError(f"history metadata is unreadable: {err}") from None


def _secret_change(a: Recorded, b: Recorded) -> str | None:
    if a.secret == b.secret:
        return None
    if a.secret is None:
        return f"{SECRET_NOTE}: now recorded by keyed hash only"
    if b.secret is None:
        return "no longer secret: its content is recorded from now on"
    return SECRET_NOTE


def _large_change(a: Recorded, b: Recorded) -> str:
    if a.stored not in _LARGE or a.ends_sha256 is None:
        return LARGE_NOTE
    if b.stored not in _LARGE:
        return "no longer a large file: its content is recorded from now on"
    what = []
    if a.size != b.size:
        what.append(f"size {a.size} -> {b.size}")
    if a.mtime != b.mtime:
        what.append("mtime changed")
    if a.ends_sha256 != b.ends_sha256:
        what.append("first or last 64 KiB changed")
    return "large file: " + ", ".join(what or ["changed"])


def _content_change(a: Recorded, b: Recorded) -> str | None:
    """None when the content is the same, else a note (never content) for the message."""
    if a.stored in _LARGE or b.stored in _LARGE:
        same = (a.stored, a.ends_sha256, a.size, a.mtime) == (b.stored, b.ends_sha256, b.size, b.mtime)
        return None if same else _large_change(a, b)
    if a.sha256 == b.sha256 and a.target == b.target and a.stored == b.stored:
        return None
    if b.stored == "unreadable":
        return "could not be read: content unknown"
    if a.stored == "unreadable":
        return "readable again"
    if b.stored == "hash-only":
        return "a name git cannot store: recorded by sha256 only"
    return f"-> {display_path(b.target or '')}" if b.kind == "link" else ""


def _new_note(b: Recorded | None) -> str:
    if b is None or b.kind != "file":
        return ""
    return {
        "secret": SECRET_NOTE,
        "large": LARGE_NOTE,
        "unreadable": "could not be read: content unknown",
        "hash-only": "a name git cannot store: recorded by sha256 only",
    }.get(b.stored, "")


def diff_meta(host: str, old: Mapping[str, Recorded], new: Mapping[str, Recorded]) -> ChangeSet:
    out: list[Change] = []
    for p in sorted(set(old) | set(new)):
        a, b = old.get(p), new.get(p)
        if a is None:
            out.append(Change(p, "new", _new_note(b)))
        elif b is None:
            out.append(Change(p, "removed"))
        elif a.kind != b.kind:
            out.append(Change(p, "type", f"{a.kind} -> {b.kind}"))
        else:
            if b.secret is not None or a.secret is not None:
                note = _secret_change(a, b)
                if note is not None:
                    out.append(Change(p, "secret-changed", note))
            else:
                note = _content_change(a, b)
                if note is not None:
                    out.append(Change(p, "changed", note))
            meta = []
            if a.mode != b.mode:
                meta.append(f"mode {a.mode:04o} -> {b.mode:04o}")
            if a.owner != b.owner:
                meta.append(f"owner {display_path(a.owner)} -> {display_path(b.owner)}")
            if a.group != b.group:
                meta.append(f"group {display_path(a.group)} -> {display_path(b.group)}")
            if meta:
                out.append(Change(p, "meta", ", ".join(meta)))
    return ChangeSet(host, tuple(out))


def _git_mode(e: Entry) -> str:
    if e.kind == "link":
        return "120000"
    return "100755" if e.mode & 0o111 else "100644"


def _tree_path(host: str, path: str) -> str:
    return f"hosts/{host}/{path.lstrip('/')}"


def _is_dotgit_alias(component: str) -> bool:
    """git's own tree-path checks (verify_path: ``.git`` in any case; core.protectNTFS, on by
    default: ``.git`` or ``git~1`` followed only by spaces or dots, or a ``:`` stream)."""
    for part in component.split("\\"):  # NTFS reads a backslash as a separator
        name = part.split(":", 1)[0].rstrip(" .").lower()
        if name in (".git", "git~1"):
            return True
    return False


def git_storable(path: str, kind: str) -> bool:
    """False for a path git refuses (silently: "Ignoring path") in a tree; such a path is
    recorded in the metadata only. Stricter than git where in doubt."""
    parts = path.lstrip("/").split("/")
    if any(p in ("", ".", "..") or _is_dotgit_alias(p) for p in parts):
        return False
    if kind == "link":  # a symlinked .gitmodules (or its NTFS short name) is refused
        last = parts[-1].rstrip(" .").lower()
        if last.startswith(".gitmodules") or last.startswith("gitmod~"):
            return False
    return True


# ---------------------------------------------------------------- the repository


class HistoryRepo:
    """A bare git repo of host snapshots. Create with ``HistoryRepo.open``."""

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        author: tuple[str, str] = DEFAULT_AUTHOR,
        remote: str | None = None,
    ) -> None:
        self.path = path
        self._key = key
        self.author = author
        self.remote = remote
        self._lock = asyncio.Lock()

    # -- set-up

    @classmethod
    def open(
        cls,
        path: Path | str,
        state_dir: Path | str,
        *,
        author: tuple[str, str] = DEFAULT_AUTHOR,
        remote: str | None = None,
    ) -> HistoryRepo:
        """Open (or create, mode 0700) the history repo; the hash key lives in ``state_dir``."""
        repo = Path(path)
        key = load_or_create_key(Path(state_dir) / "history.key")
        fresh = not (repo / "HEAD").exists()
        repo.mkdir(mode=0o700, parents=True, exist_ok=True)
        if repo.stat().st_mode & 0o077:
            log.warning("history repo was not private; setting mode 0700", path=str(repo))
        os.chmod(repo, 0o700)
        if fresh:
            if any(repo.iterdir()):
                raise HistoryError(f"{repo} exists, is not empty and is not a git repository")
            _git_sync(repo, "init", "--quiet", "--bare", f"--initial-branch={BRANCH}", str(repo))
        elif not (repo / "objects").is_dir():
            raise HistoryError(f"{repo} is not a bare git repository")
        return cls(repo, key, author=author, remote=remote)

    # -- git plumbing

    async def _git(
        self, *args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None, check: bool = True
    ) -> tuple[int, bytes, bytes]:
        full_env = _base_env()
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            "git",
            f"--git-dir={self.path}",
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
        )
        out, err = await proc.communicate(stdin)
        rc = proc.returncode if proc.returncode is not None else -1
        if check and rc != 0:
            raise HistoryError(
                f"history repo {self.path}: git {args[0]} failed (exit {rc}): "
                + err.decode("utf-8", "replace").strip()[:500]
            )
        return rc, out, err

    async def head(self) -> str | None:
        rc, out, _ = await self._git("rev-parse", "--verify", "-q", f"{REF}^{{commit}}", check=False)
        return out.decode().strip() if rc == 0 else None

    def check_locks(self) -> None:
        for name in _LOCK_FILES:
            lock = self.path / name
            if lock.exists():
                raise HistoryError(
                    f"history repo {self.path}: stale lock {lock} (a git process crashed or is still "
                    "running); nothing was recorded. Remove it once no git process uses the repo."
                )

    async def recorded(self, host: str, commit: str | None = None) -> dict[str, Recorded]:
        """What the history holds for ``host`` at ``commit`` (default HEAD)."""
        rev = commit or await self.head()
        if rev is None:
            return {}
        rc, out, _ = await self._git("cat-file", "blob", f"{rev}:meta/{host}.json", check=False)
        if rc != 0:
            rc2, out2, _ = await self._git("ls-tree", "--name-only", rev, f"meta/{host}.json", check=False)
            if rc2 == 0 and not out2.strip():
                return {}
            raise HistoryError(f"history repo {self.path}: cannot read meta/{host}.json at {rev}")
        return decode_meta(out)

    # -- recording

    def secret_digest(self, path: str, sha256: str | None) -> str:
        data = path_bytes(path) + b"\0" + (sha256 or "unreadable").encode()
        return "hmac-sha256:" + hmac.new(self._key, data, hashlib.sha256).hexdigest()

    async def prepare(self, snap: Snapshot, previous: Mapping[str, Recorded] | None = None) -> Prepared:
        """Turn a snapshot into recorded metadata and the blobs that changed (pure apart from
        reading the previous state)."""
        prev = dict(previous) if previous is not None else await self.recorded(snap.host)
        meta: dict[str, Recorded] = {}
        blobs: dict[str, tuple[str, bytes | None]] = {}
        for path, e in snap.entries.items():
            storable = git_storable(path, e.kind)
            if e.kind == "file":
                if path in snap.secrets:
                    digest = self.secret_digest(path, content_id(e))
                    rec = Recorded("file", e.mode, e.owner, e.group, secret=digest, stored="secret")
                    data = (
                        SECRET_MARKER_HEAD
                        + f"# {digest} (keyed hash; the key is not in this repo)\n".encode()
                    )
                elif e.large and e.ends_sha256 is not None:
                    rec = Recorded(
                        "file", e.mode, e.owner, e.group, stored="large",
                        size=e.size, mtime=e.mtime, ends_sha256=e.ends_sha256,
                    )  # fmt: skip
                    data = (
                        f"# reconciler: {LARGE_NOTE}\n# size {e.size}\n# mtime {e.mtime!r}\n"
                        f"# sha256 of the first and last 64 KiB {e.ends_sha256}\n"
                    ).encode()
                elif e.sha256 is None:
                    rec = Recorded("file", e.mode, e.owner, e.group, stored="unreadable")
                    data = b"# reconciler: content not readable\n"
                elif not storable:
                    rec = Recorded("file", e.mode, e.owner, e.group, sha256=e.sha256, stored="hash-only")
                    meta[path] = rec
                    continue
                else:
                    rec = Recorded("file", e.mode, e.owner, e.group, sha256=e.sha256)
                    old = prev.get(path)
                    if old is not None and old.sha256 == e.sha256 and old.stored == "content":
                        if (old.mode & 0o111 != 0) == (e.mode & 0o111 != 0):
                            meta[path] = rec
                            continue  # same blob, same git mode: nothing to write
                    if path not in snap.contents:
                        if old is not None and old.sha256 == e.sha256:
                            blobs[path] = (_git_mode(e), None)  # git mode change only: reuse the blob
                            meta[path] = rec
                            continue
                        shown = display_path(path)
                        raise HistoryError(f"{snap.host}:{shown}: content changed but was not fetched")
                    data = snap.contents[path]
                if storable:
                    blobs[path] = (_git_mode(e), data)
                meta[path] = rec
            elif e.kind == "link":
                meta[path] = Recorded("link", e.mode, e.owner, e.group, target=e.target or "", stored="none")
                old = prev.get(path)
                if storable and (old is None or old.target != e.target or old.kind != "link"):
                    blobs[path] = ("120000", path_bytes(e.target or ""))
            else:
                meta[path] = Recorded(e.kind, e.mode, e.owner, e.group, stored="none")
        return Prepared(snap.host, meta, prev, diff_meta(snap.host, prev, meta), blobs)

    async def commit(self, prep: Prepared, message: str) -> CommitInfo | None:
        """Record ``prep`` as one commit, or return None if HEAD already holds exactly this tree
        (idempotent: a retried scan never makes a second commit). Raises HistoryError."""
        self.check_locks()
        if not prep.changes and prep.previous:
            # nothing differs from what HEAD held when the scan read it: same tree, no git work
            if await self.recorded(prep.host) == dict(prep.previous):
                return None
        tmp = Path(tempfile.mkdtemp(prefix="reconciler-history-", dir=self.path))
        try:
            # objects are content-addressed: write them before taking the lock
            shas = await self._write_blobs(prep, tmp)
            _, meta_out, _ = await self._git("hash-object", "-w", "--stdin", stdin=encode_meta(prep.meta))
            meta_sha = meta_out.decode().strip()
            async with self._lock:
                for attempt in range(5):
                    self.check_locks()
                    head = await self.head()
                    try:
                        return await self._commit_once(prep, message, head, dict(shas), meta_sha, tmp)
                    except _RefMoved:
                        log.info("history ref moved meanwhile; retrying", host=prep.host, attempt=attempt)
            raise HistoryError(f"history repo {self.path}: the branch kept moving; gave up")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _write_blobs(self, prep: Prepared, tmp: Path) -> dict[str, str]:
        files: list[tuple[str, Path]] = []
        for i, (p, (_, data)) in enumerate(prep.blobs.items()):
            if data is None:
                continue
            f = tmp / f"b{i}"
            f.write_bytes(data)
            files.append((p, f))
        shas: dict[str, str] = {}
        if files:
            _, out, _ = await self._git(
                "hash-object", "-w", "--no-filters", "--stdin-paths",
                stdin=b"".join(str(f).encode() + b"\n" for _, f in files),
            )  # fmt: skip
            for (p, _), sha in zip(files, out.decode().split(), strict=True):
                shas[p] = sha
        return shas

    async def _ls_tree(self, treeish: str | None) -> list[bytes]:
        if treeish is None:
            return []
        rc, out, _ = await self._git("ls-tree", "-z", treeish, check=False)
        return [e for e in out.split(b"\0") if e] if rc == 0 else []

    async def _mktree(self, entries: list[bytes], name: bytes, entry: bytes) -> str:
        """``entries`` (ls-tree -z lines) with the one called ``name`` replaced by ``entry``."""
        kept = [e for e in entries if e.split(b"\t", 1)[1] != name]
        _, out, _ = await self._git("mktree", "-z", stdin=b"".join(e + b"\0" for e in [*kept, entry]))
        return out.decode().strip()

    async def _commit_once(
        self, prep: Prepared, message: str, head: str | None, shas: dict[str, str], meta_sha: str, tmp: Path
    ) -> CommitInfo | None:
        host = prep.host
        head_meta = await self.recorded(host, head) if head else {}
        if head_meta != dict(prep.previous):
            raise HistoryConflict(
                f"history of {host} changed while this scan ran (another reconciler process?); rescan"
            )
        need = dict(prep.blobs)
        mode_only = [p for p, (_, d) in need.items() if d is None]
        if mode_only:
            shas.update(await self._existing_blobs(head, host, mode_only))
        # Only this host's subtree goes through an index (cost independent of the fleet size);
        # then hosts/, meta/ and the root are rebuilt with mktree around it.
        index_env = {"GIT_INDEX_FILE": str(tmp / "index")}
        old_host_tree = None
        if head:
            rc, out, _ = await self._git("rev-parse", "--verify", "-q", f"{head}:hosts/{host}", check=False)
            old_host_tree = out.decode().strip() if rc == 0 else None
        if old_host_tree:
            await self._git("read-tree", old_host_tree, env=index_env)
        lines: list[bytes] = []
        # remove what is gone (relative to what HEAD holds), and paths that stopped being files
        for p, old in head_meta.items():
            new = prep.meta.get(p)
            if old.kind in ("file", "link") and (
                new is None or new.kind not in ("file", "link") or not git_storable(p, new.kind)
            ):
                lines.append(b"0 " + ZERO.encode() + b"\t" + path_bytes(p.lstrip("/")))
        for p, (mode, _) in need.items():
            if p in shas:
                lines.append(f"{mode} {shas[p]}\t".encode() + path_bytes(p.lstrip("/")))
        if lines:
            _, _, err = await self._git(
                "update-index", "-z", "--index-info", stdin=b"\0".join(lines) + b"\0", env=index_env
            )
            if b"Ignoring path" in err:  # a name git refuses that git_storable let through
                refused = err.count(b"Ignoring path")
                log.warning("git refused some paths; metadata only", host=host, count=refused)
        _, tree_out, _ = await self._git("write-tree", env=index_env)
        host_tree = tree_out.decode().strip()
        root_entries = await self._ls_tree(head)
        hosts_tree = await self._mktree(
            await self._ls_tree(f"{head}:hosts" if head else None),
            host.encode(),
            f"040000 tree {host_tree}\t{host}".encode(),
        )
        meta_tree = await self._mktree(
            await self._ls_tree(f"{head}:meta" if head else None),
            f"{host}.json".encode(),
            f"100644 blob {meta_sha}\t{host}.json".encode(),
        )
        root_entries = [e for e in root_entries if e.split(b"\t", 1)[1] != b"meta"]
        root_entries.append(f"040000 tree {meta_tree}\tmeta".encode())
        tree = await self._mktree(root_entries, b"hosts", f"040000 tree {hosts_tree}\thosts".encode())
        head_tree = (await self._git("rev-parse", f"{head}^{{tree}}"))[1].decode().strip() if head else None
        if tree == head_tree:
            return None
        name, email = self.author
        env = {
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
        }
        parent_args = ("-p", head) if head else ()
        # the message names paths in their display form; never raw bytes that are not UTF-8
        body = message.encode("utf-8", "backslashreplace")
        _, c_out, _ = await self._git("commit-tree", tree, *parent_args, "-F", "-", stdin=body, env=env)
        sha = c_out.decode().strip()
        rc, _, err = await self._git("update-ref", REF, sha, head or ZERO, check=False)
        if rc != 0:
            text = err.decode("utf-8", "replace")
            if "but expected" in text or "reference already exists" in text:
                raise _RefMoved()
            raise HistoryError(f"history repo {self.path}: cannot update {REF}: {text.strip()[:500]}")
        log.info("history commit", host=host, commit=sha[:12], changes=len(prep.changes.changes))
        return CommitInfo(sha, head, host, message)

    async def _existing_blobs(self, head: str | None, host: str, paths: Sequence[str]) -> dict[str, str]:
        """The blobs HEAD holds for ``paths`` (a git mode change only). A path whose blob is not
        in the tree (git ignored its name) is left out: it stays in the metadata only."""
        if not head:
            raise _RefMoved()
        out: dict[str, str] = {}
        for p in paths:
            rc, o, _ = await self._git(
                "rev-parse", "--verify", "-q", f"{head}:{_tree_path(host, p)}", check=False
            )
            if rc == 0:
                out[p] = o.decode().strip()
            else:
                log.warning("history has no blob for a path; metadata only", host=host, path=display_path(p))
        return out

    # -- reading back

    async def host_commits(self, host: str, since: str | None = None) -> list[str]:
        """Commits (oldest first) that touched ``host`` after ``since`` (exclusive)."""
        head = await self.head()
        if head is None:
            return []
        rng = f"{since}..{head}" if since else head
        rc, out, err = await self._git("rev-list", "--reverse", rng, "--", f"meta/{host}.json", check=False)
        if rc != 0:
            if since:  # the cursor commit is unknown (repo replaced?): fall back to everything
                log.warning("history cursor commit unknown; rescanning", host=host, since=since)
                return await self.host_commits(host, None)
            raise HistoryError(
                f"history repo {self.path}: rev-list failed: {err.decode(errors='replace')[:300]}"
            )
        return out.decode().split()

    async def get_ref(self, ref: str) -> str | None:
        rc, out, _ = await self._git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        return out.decode().strip() if rc == 0 else None

    async def set_ref(self, ref: str, new: str, old: str | None) -> None:
        """Move a bookkeeping ref (e.g. refs/mailed/<host>) from ``old`` to ``new``."""
        if not ref.startswith("refs/mailed/"):
            raise ValueError(f"not a bookkeeping ref: {ref}")
        if new == old:
            return
        await self._git("update-ref", ref, new, old or "")

    async def message(self, commit: str) -> str:
        return (await self._git("log", "-1", "--format=%B", commit))[1].decode("utf-8", "replace")

    async def parent(self, commit: str) -> str | None:
        rc, out, _ = await self._git("rev-parse", "--verify", "-q", f"{commit}^", check=False)
        return out.decode().strip() if rc == 0 else None

    async def changes_in(self, commit: str, host: str) -> ChangeSet:
        parent = await self.parent(commit)
        old = await self.recorded(host, parent) if parent else {}
        return diff_meta(host, old, await self.recorded(host, commit))

    async def diff(self, commit: str, host: str, *, max_bytes: int = 200_000) -> str:
        """Unified diff of ``host``'s files in ``commit``; secret files are left out entirely."""
        parent = await self.parent(commit) or EMPTY_TREE
        new_meta = await self.recorded(host, commit)
        old_meta = await self.recorded(host, parent) if parent != EMPTY_TREE else {}
        excluded = sorted(
            p
            for p in set(new_meta) | set(old_meta)
            if any(m.get(p) is not None and m[p].stored == "secret" for m in (new_meta, old_meta))
        )
        specs = [f":(literal)hosts/{host}/"] + [f":(exclude,literal){_tree_path(host, p)}" for p in excluded]
        _, out, _ = await self._git(
            "-c",
            "core.quotePath=false",
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-renames",
            f"--relative=hosts/{host}/",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            parent,
            commit,
            "--",
            *specs,
        )
        text = out.decode("utf-8", "backslashreplace")  # a byte that is not UTF-8 shows as \xff
        if len(text) > max_bytes:
            text = text[:max_bytes] + f"\n[diff truncated at {max_bytes} bytes; see the history repo]\n"
        return text

    async def push(self) -> None:
        if not self.remote:
            return
        await self._git("push", "--quiet", self.remote, f"{REF}:{REF}")


class _RefMoved(Exception):
    pass


@dataclass(frozen=True)
class Recall:
    """What the history holds for a host, in the form ``snapshot.take_snapshot`` asks for it:
    so unchanged files are not fetched again (secrets included, by their keyed hash)."""

    repo: HistoryRepo
    previous: Mapping[str, Recorded]

    def sha256(self, path: str) -> str | None:
        r = self.previous.get(path)
        return r.sha256 if r is not None and r.stored in ("content", "hash-only") else None

    def large(self, path: str) -> tuple[int, float, str] | None:
        r = self.previous.get(path)
        if r is None or r.stored != "large" or r.size is None or r.mtime is None or not r.ends_sha256:
            return None
        return r.size, r.mtime, r.ends_sha256

    def secret_unchanged(self, path: str, content: str) -> bool:
        r = self.previous.get(path)
        return r is not None and r.secret is not None and r.secret == self.repo.secret_digest(path, content)


class HistoryConflict(HistoryError):
    """Another writer recorded this host between our read and our commit: scan again."""


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSH_AUTH_SOCK")
    }
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "LC_ALL": "C",
        }
    )
    return env


def _git_sync(repo: Path, *args: str) -> None:
    import subprocess

    res = subprocess.run(["git", *args], capture_output=True, env=_base_env(), check=False)
    if res.returncode != 0:
        raise HistoryError(
            f"history repo {repo}: git {args[0]} failed: {res.stderr.decode(errors='replace')[:500]}"
        )


def load_or_create_key(path: Path) -> bytes:
    """The history's secret-hash key: 32 random bytes, mode 0600, created atomically once."""
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
        raise HistoryError(f"{path}: history key is truncated")
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _secrets.token_bytes(32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".history.key.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic; loses the race to a concurrent creator gracefully
    except FileExistsError:
        os.unlink(tmp)
        return path.read_bytes()
    os.unlink(tmp)
    return key


def commit_subject(changes: ChangeSet, roots: Sequence[str], in_line: frozenset[str] = frozenset()) -> str:
    """The commit's first line (and the mail subject); ``in_line``: paths that changed to what
    the fleet wants (applied or enforced), which are not drift and not counted."""

    def n(paths: Sequence[str]) -> int:
        return sum(1 for p in paths if p not in in_line)

    return (
        f"{changes.host}: {n(changes.changed)} changed, {n(changes.new)} new, "
        f"{n(changes.removed)} removed in {', '.join(roots)}"
    )
