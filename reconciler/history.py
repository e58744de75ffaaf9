"""The /etc history repository: one git repo, every host under ``hosts/<host>/<path>``.

Layout of a commit's tree::

    hosts/<host>/etc/hosts          file content (mode 100644, or 100755 if executable)
    hosts/<host>/etc/alternatives/x symlinks as git symlinks (120000, blob = target)
    hosts/<host>/etc/shadow         a marker: "secret, content never stored" + a keyed hash
    meta/<host>.json                one line per path: kind, mode, owner, group, sha256 (or the
                                    keyed hash for a secret), link target

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

from reconciler.errors import ReconcilerError
from reconciler.log import get_logger
from reconciler.snapshot import Entry, Snapshot

log = get_logger(__name__)

BRANCH = "main"
REF = f"refs/heads/{BRANCH}"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
ZERO = "0" * 40
DEFAULT_AUTHOR = ("reconciler", "reconciler@localhost")
SECRET_MARKER_HEAD = b"# reconciler: secret file, content never stored\n"
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
    stored: str = "content"  # "content", "secret", "too-large", "unreadable", "none"

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


def diff_meta(host: str, old: Mapping[str, Recorded], new: Mapping[str, Recorded]) -> ChangeSet:
    out: list[Change] = []
    for p in sorted(set(old) | set(new)):
        a, b = old.get(p), new.get(p)
        if a is None:
            out.append(Change(p, "new"))
        elif b is None:
            out.append(Change(p, "removed"))
        elif a.kind != b.kind:
            out.append(Change(p, "type", f"{a.kind} -> {b.kind}"))
        else:
            if b.secret is not None or a.secret is not None:
                if a.secret != b.secret:
                    out.append(Change(p, "secret-changed"))
            elif a.sha256 != b.sha256 or a.target != b.target:
                detail = f"-> {b.target}" if b.kind == "link" else ""
                out.append(Change(p, "changed", detail))
            meta = []
            if a.mode != b.mode:
                meta.append(f"mode {a.mode:04o} -> {b.mode:04o}")
            if a.owner != b.owner:
                meta.append(f"owner {a.owner} -> {b.owner}")
            if a.group != b.group:
                meta.append(f"group {a.group} -> {b.group}")
            if meta:
                out.append(Change(p, "meta", ", ".join(meta)))
    return ChangeSet(host, tuple(out))


def _git_mode(e: Entry) -> str:
    if e.kind == "link":
        return "120000"
    return "100755" if e.mode & 0o111 else "100644"


def _tree_path(host: str, path: str) -> str:
    return f"hosts/{host}/{path.lstrip('/')}"


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
        mac = hmac.new(self._key, f"{path}\0{sha256 or 'unreadable'}".encode(), hashlib.sha256)
        return "hmac-sha256:" + mac.hexdigest()

    async def prepare(self, snap: Snapshot, previous: Mapping[str, Recorded] | None = None) -> Prepared:
        """Turn a snapshot into recorded metadata and the blobs that changed (pure apart from
        reading the previous state)."""
        prev = dict(previous) if previous is not None else await self.recorded(snap.host)
        meta: dict[str, Recorded] = {}
        blobs: dict[str, tuple[str, bytes | None]] = {}
        for path, e in snap.entries.items():
            if e.kind == "file":
                if path in snap.secrets:
                    digest = self.secret_digest(path, e.sha256)
                    rec = Recorded("file", e.mode, e.owner, e.group, secret=digest, stored="secret")
                    data = (
                        SECRET_MARKER_HEAD
                        + f"# {digest} (keyed hash; the key is not in this repo)\n".encode()
                    )
                elif path in snap.too_large:
                    rec = Recorded("file", e.mode, e.owner, e.group, sha256=e.sha256, stored="too-large")
                    data = (
                        f"# reconciler: content not stored ({e.size} bytes)\n# sha256 {e.sha256}\n".encode()
                    )
                elif e.sha256 is None:
                    rec = Recorded("file", e.mode, e.owner, e.group, stored="unreadable")
                    data = b"# reconciler: content not readable\n"
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
                        raise HistoryError(f"{snap.host}:{path}: content changed but was not fetched")
                    data = snap.contents[path]
                blobs[path] = (_git_mode(e), data)
                meta[path] = rec
            elif e.kind == "link":
                meta[path] = Recorded("link", e.mode, e.owner, e.group, target=e.target or "", stored="none")
                old = prev.get(path)
                if old is None or old.target != e.target or old.kind != "link":
                    blobs[path] = ("120000", (e.target or "").encode("utf-8", "surrogateescape"))
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
            if old.kind in ("file", "link") and (new is None or new.kind not in ("file", "link")):
                lines.append(b"0 " + ZERO.encode() + b"\t" + p.lstrip("/").encode("utf-8", "surrogateescape"))
        for p, (mode, _) in need.items():
            lines.append(f"{mode} {shas[p]}\t".encode() + p.lstrip("/").encode("utf-8", "surrogateescape"))
        if lines:
            await self._git(
                "update-index", "-z", "--index-info", stdin=b"\0".join(lines) + b"\0", env=index_env
            )
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
        _, c_out, _ = await self._git(
            "commit-tree", tree, *parent_args, "-F", "-", stdin=message.encode(), env=env
        )
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
        if not head:
            raise _RefMoved()
        out: dict[str, str] = {}
        for p in paths:
            rc, o, _ = await self._git(
                "rev-parse", "--verify", "-q", f"{head}:{_tree_path(host, p)}", check=False
            )
            if rc != 0:
                raise _RefMoved()
            out[p] = o.decode().strip()
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
        text = out.decode("utf-8", "replace")
        if len(text) > max_bytes:
            text = text[:max_bytes] + f"\n[diff truncated at {max_bytes} bytes; see the history repo]\n"
        return text

    async def push(self) -> None:
        if not self.remote:
            return
        await self._git("push", "--quiet", self.remote, f"{REF}:{REF}")


class _RefMoved(Exception):
    pass


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
