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
import os
import secrets as _secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.drift.history_branches import BRANCHES_HOST, BRANCHES_MAIN, TRANSPORT_ENV, HostBranches
from reconciler.drift.history_meta import (  # re-exported: the history's vocabulary
    SECRET_NOTE as SECRET_NOTE,
)
from reconciler.drift.history_meta import (
    Change as Change,
)
from reconciler.drift.history_meta import (
    ChangeSet as ChangeSet,
)
from reconciler.drift.history_meta import (
    HistoryError as HistoryError,
)
from reconciler.drift.history_meta import (
    Recorded as Recorded,
)
from reconciler.drift.history_meta import (
    commit_subject as commit_subject,
)
from reconciler.drift.history_meta import (
    decode_meta as decode_meta,
)
from reconciler.drift.history_meta import (
    diff_meta as diff_meta,
)
from reconciler.drift.history_meta import (
    encode_meta as encode_meta,
)
from reconciler.drift.history_meta import (
    git_storable as git_storable,
)
from reconciler.drift.history_prepare import Prepared as Prepared
from reconciler.drift.history_prepare import prepare_snapshot
from reconciler.drift.snapshot import Snapshot, display_path, path_bytes
from reconciler.gitrepo import (
    GitRepo,
    GitResult,
    OutputTooLarge,
    UnreadableObject,
    first_line,
    init_bare,
    isolated_env,
    redact_url,
)
from reconciler.log import get_logger

log = get_logger(__name__)

BRANCH = "main"
REF = f"refs/heads/{BRANCH}"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
ZERO = "0" * 40
DEFAULT_AUTHOR = ("reconciler", "reconciler@localhost")
GIT_TIMEOUT = 600.0  # a plumbing command of a large /etc (a disk stall is an error, not a hang)
MAX_GIT_OUTPUT = 1 << 30
_LOCK_FILES = ("index.lock", "HEAD.lock", f"{REF}.lock", "packed-refs.lock", "config.lock")


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    parent: str | None
    host: str
    message: str


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
        branches: str = BRANCHES_MAIN,
    ) -> None:
        if branches not in (BRANCHES_MAIN, BRANCHES_HOST):
            raise ValueError(f"history branches: {branches!r} (expected main or host)")
        self.path = path
        self._key = key
        self.author = author
        self.remote = remote
        self.branches = branches  # what push() sends: main, or one branch per host
        self._lock = asyncio.Lock()
        self._repo = GitRepo(path, env=isolated_env(inherit=False), error=HistoryError)

    # -- set-up

    @classmethod
    def open(
        cls,
        path: Path | str,
        state_dir: Path | str,
        *,
        author: tuple[str, str] = DEFAULT_AUTHOR,
        remote: str | None = None,
        branches: str = BRANCHES_MAIN,
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
            init_bare(repo, initial_branch=BRANCH, env=isolated_env(inherit=False))
        elif not (repo / "objects").is_dir():
            raise HistoryError(f"{repo} is not a bare git repository")
        return cls(repo, key, author=author, remote=remote, branches=branches)

    # -- git plumbing

    async def _git(
        self, *args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None, check: bool = True
    ) -> tuple[int, bytes, bytes]:
        try:
            res: GitResult = await self._repo.run(
                args, stdin=stdin, env=env, timeout=GIT_TIMEOUT, max_output=MAX_GIT_OUTPUT
            )
        except OutputTooLarge:
            raise HistoryError(f"history repo {self.path}: git {args[0]} wrote too much") from None
        if check and res.code != 0:
            raise HistoryError(
                f"history repo {self.path}: git {args[0]} failed (exit {res.code}): "
                + res.stderr.decode("utf-8", "replace").strip()[:500]
            )
        return res.code, res.stdout, res.stderr

    async def head(self) -> str | None:
        return await self._repo.resolve(REF)

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
        data = await self._repo.read_blob(rev, f"meta/{host}.json")  # names we wrote: GitPython
        return {} if data is None else decode_meta(data)

    # -- recording

    def secret_digest(self, path: str, sha256: str | None) -> str:
        data = path_bytes(path) + b"\0" + (sha256 or "unreadable").encode()
        return "hmac-sha256:" + hmac.new(self._key, data, hashlib.sha256).hexdigest()

    async def prepare(self, snap: Snapshot, previous: Mapping[str, Recorded] | None = None) -> Prepared:
        """Turn a snapshot into recorded metadata and the blobs that changed (pure apart from
        reading the previous state)."""
        prev = dict(previous) if previous is not None else await self.recorded(snap.host)
        return prepare_snapshot(snap, prev, self.secret_digest)

    async def commit(self, prep: Prepared, message: str) -> CommitInfo | None:
        """Record ``prep`` as one commit, or return None if HEAD already holds exactly this tree
        (idempotent: a retried scan never makes a second commit). Raises HistoryError. Lock files
        are checked under ``self._lock`` only: outside it, a sibling host's commit in flight holds
        HEAD.lock for a moment, and that lock is not stale (seen at 300 hosts)."""
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
        return await self._repo.resolve(ref)

    async def set_ref(self, ref: str, new: str, old: str | None) -> None:
        """Move a bookkeeping ref (e.g. refs/mailed/<host>) from ``old`` to ``new``."""
        if not ref.startswith("refs/mailed/"):
            raise ValueError(f"not a bookkeeping ref: {ref}")
        if new == old:
            return
        await self._git("update-ref", ref, new, old or "")

    async def message(self, commit: str) -> str:
        try:
            return (await self._repo.commit(commit)).message
        except UnreadableObject as err:
            raise HistoryError(str(err)) from None

    async def parent(self, commit: str) -> str | None:
        try:
            parents = (await self._repo.commit(commit)).parents
        except UnreadableObject as err:
            raise HistoryError(str(err)) from None
        return parents[0] if parents else None

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
        """Push to ``remote`` (ssh: batch mode, known host keys only): ``main``, or with
        ``branches == "host"`` each host's new commits to its own branch (history_branches.py).
        Raises HistoryError naming the remote without credentials."""
        if not self.remote:
            return
        if self.branches == BRANCHES_HOST:
            await HostBranches(self.path, self._git, self.remote, TRANSPORT_ENV).push(await self.head())
            return
        res = await self._repo.run(
            ["push", "--quiet", "--", self.remote, f"{REF}:{REF}"], env=TRANSPORT_ENV, timeout=GIT_TIMEOUT
        )
        if res.code != 0:
            shown = redact_url(self.remote)
            why = first_line(res.stderr).replace(self.remote, shown)
            raise HistoryError(f"history push to {shown} failed: {why}")


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
