"""The /etc history pushed as one branch per host: ``refs/heads/hosts/<host>`` on the remote.

Several daemon replicas (a sharded StatefulSet) each keep their own history repo, whose ``main``
holds every host it recorded. Pushing ``main`` from each to one remote would make them reject each
other, so in this mode (``history_branches: host``) a replica never pushes ``main``: it pushes,
for each host it has new commits for, a branch whose commits are exactly its local commits that
touched that host (same message, same author and committer lines, so same dates) and whose tree
holds only that host's part (``hosts/<host>/...`` and ``meta/<host>.json``: a clone of the branch
reads like the local repo).

Incremental: bookkeeping refs in the local repo say what was pushed::

    refs/history-mirror/source/<host>   the last local commit of <host> that is on the remote
    refs/history-mirror/tip/<host>      the mirrored commit the remote branch had after that push
    refs/history-mirror/done            every host's commits up to here are on the remote

so a push reads the local commits after ``done`` only (one ``git log``) and costs O(new commits).
The refs move only after the remote accepted the push (one ``update-ref --stdin`` transaction).

Building is deterministic: a mirrored commit is hashed here from (parent, host subtree, meta
blob, the source's author/committer lines and message), then written with ``hash-object``.
A crash between building and pushing leaves the refs unmoved: the next push builds the same
commits again. A crash after the remote accepted but before the refs moved: the next push finds
the remote tip among the commits it would build and pushes only what follows (no duplicate).

Several writers: before each push the remote's host tips are listed (``ls-remote``); a tip this
repo does not know (another replica pushed the host: a resharding, a replica killed) is fetched
and the new commits are built on top of it, so the branch continues fast-forward. A push the
remote rejects because another replica pushed the same host meanwhile is retried from a fresh
listing (``MAX_ATTEMPTS``), then reported. Never a force push, never a deleted branch, never
``main``.

A host name becomes a ref name: it must be a fleet host name (lowercase letters, digits, '-'),
which is always a valid ref component (``git check-ref-format``); any other name found in the
history is refused by name and its commits stay local.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.drift.history_meta import HistoryError
from reconciler.gitrepo import first_line, redact_url
from reconciler.log import get_logger

log = get_logger(__name__)

BRANCHES_MAIN = "main"  # push refs/heads/main (one replica)
BRANCHES_HOST = "host"  # push refs/heads/hosts/<host>, one branch per host (history_branches.py)
# the remote's transport: ssh in batch mode, known host keys only
TRANSPORT_ENV = {
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=15",
    "GIT_SSH_VARIANT": "ssh",
}
REMOTE_PREFIX = "refs/heads/hosts/"
SOURCE_PREFIX = "refs/history-mirror/source/"
TIP_PREFIX = "refs/history-mirror/tip/"
FETCHED_PREFIX = "refs/history-mirror/fetched/"
DONE_REF = "refs/history-mirror/done"
MAX_ATTEMPTS = 4
ZERO = "0" * 40
# the fleet's host names (schemas: hostName), with room: every such name is a valid ref component
_HOST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SHA = re.compile(r"[0-9a-f]{40}")
# a push refused because another writer moved the branch (or holds its lock) at that moment
_CONTENDED = ("fetch first", "non-fast-forward", "failed to update ref", "failed to lock")
_COPIED_HEADERS = (b"author ", b"committer ", b"encoding ")

Git = Callable[..., Awaitable[tuple[int, bytes, bytes]]]


def valid_host_ref(host: str) -> bool:
    """Whether ``host`` may name ``refs/heads/hosts/<host>``: a fleet host name (no '/', '.',
    space, control character, '~^:?*[\\' or '@{'), so ``git check-ref-format`` accepts it."""
    return _HOST_NAME.fullmatch(host) is not None


# ---------------------------------------------------------------- pure: the mirrored objects


@dataclass(frozen=True)
class SourceCommit:
    """A local commit that touched ``host``: what its mirrored commit is made of."""

    sha: str
    host: str
    headers: bytes  # its author and committer (and encoding) lines, verbatim
    message: bytes
    host_tree: str | None  # hosts/<host> (None: no file git could store)
    meta_blob: str


@dataclass(frozen=True)
class GitObject:
    kind: str  # "tree" or "commit"
    body: bytes

    @property
    def sha(self) -> str:
        header = f"{self.kind} {len(self.body)}\0".encode()
        return hashlib.sha1(header + self.body, usedforsecurity=False).hexdigest()


def _tree(entries: Iterable[tuple[bytes, bytes, str]]) -> GitObject:
    """A tree of (mode, name, sha) entries; names sorted as git does (a tree as ``name/``)."""
    key = {True: b"/", False: b""}
    ordered = sorted(entries, key=lambda e: e[1] + key[e[0] == b"40000"])
    return GitObject("tree", b"".join(m + b" " + n + b"\0" + bytes.fromhex(s) for m, n, s in ordered))


def mirror_chain(base: str | None, sources: Sequence[SourceCommit]) -> list[tuple[str, list[GitObject]]]:
    """The mirrored commits of ``sources`` (oldest first) on top of ``base``: for each, its sha and
    the objects it needs (three small trees and the commit). Pure and deterministic."""
    out: list[tuple[str, list[GitObject]]] = []
    parent = base
    for src in sources:
        name = src.host.encode()
        meta = _tree([(b"100644", name + b".json", src.meta_blob)])
        root_entries = [(b"40000", b"meta", meta.sha)]
        objects = [meta]
        if src.host_tree is not None:
            hosts = _tree([(b"40000", name, src.host_tree)])
            objects.append(hosts)
            root_entries.append((b"40000", b"hosts", hosts.sha))
        root = _tree(root_entries)
        body = b"tree " + root.sha.encode() + b"\n"
        if parent is not None:
            body += b"parent " + parent.encode() + b"\n"
        commit = GitObject("commit", body + src.headers + b"\n" + src.message)
        objects += [root, commit]
        out.append((commit.sha, objects))
        parent = commit.sha
    return out


def split_commit(raw: bytes) -> tuple[bytes, bytes]:
    """(the header lines kept in a mirror, the message) of a raw commit object."""
    head, sep, message = raw.partition(b"\n\n")
    if not sep:
        head, message = raw.rstrip(b"\n"), b""
    kept = b"".join(line + b"\n" for line in head.split(b"\n") if line.startswith(_COPIED_HEADERS))
    return kept, message


def parse_log(out: bytes) -> list[tuple[str, list[str]]]:
    """``git log --format=%x01%H -z --name-only`` -> [(commit, [host, ...])] (oldest first when
    logged with --reverse); names that are not ``meta/<host>.json`` are skipped."""
    rows: list[tuple[str, list[str]]] = []
    for chunk in out.split(b"\x01"):
        if not chunk:
            continue
        sha, _, rest = chunk.partition(b"\0")
        hosts = []
        for name in rest.lstrip(b"\n").split(b"\0"):
            if name.startswith(b"meta/") and name.endswith(b".json") and name.count(b"/") == 1:
                hosts.append(name[5:-5].decode("utf-8", "surrogateescape"))
        rows.append((sha.decode().strip(), hosts))
    return rows


@dataclass(frozen=True)
class PushOutcome:
    hosts: tuple[str, ...]  # branches that moved on the remote
    commits: int  # mirrored commits made reachable on the remote


# ---------------------------------------------------------------- the push


class HostBranches:
    """Pushes a history repo's new host commits to ``remote``, one branch per host."""

    def __init__(self, git_dir: Path, git: Git, remote: str, transport_env: Mapping[str, str]) -> None:
        self.git_dir = git_dir
        self._git = git
        self.remote = remote
        self._env = dict(transport_env)
        self.shown = redact_url(remote)

    async def push(self, head: str | None) -> PushOutcome:
        """Mirror and push every host commit up to ``head`` not yet on the remote. Raises
        HistoryError (remote unreachable, a refused host name, a branch still contended after
        ``MAX_ATTEMPTS``) once every host that could be pushed was."""
        if head is None:
            return PushOutcome((), 0)
        refs = await self._mirror_refs()
        pending, refused = await self._pending(refs, head)
        pushed: list[str] = []
        commits = 0
        if pending:
            sources = await self._read_sources(pending)
            for attempt in range(MAX_ATTEMPTS):
                done, count = await self._attempt(sources, refs)
                pushed += done
                commits += count
                for host in done:
                    sources.pop(host)
                if not sources:
                    break
                log.info("history branches moved meanwhile; retrying", hosts=len(sources), attempt=attempt)
                refs = await self._mirror_refs()
            if sources:
                raise HistoryError(
                    f"history push to {self.shown}: branches still moved by another writer after "
                    f"{MAX_ATTEMPTS} attempts: " + ", ".join(REMOTE_PREFIX + h for h in sorted(sources))
                )
        if refs.get(DONE_REF) != head:
            await self._update_refs([(DONE_REF, head, refs.get(DONE_REF))])
        if refused:
            raise HistoryError(
                f"history push to {self.shown}: host names that cannot name a branch were not pushed "
                "(their history stays local): " + ", ".join(repr(h[:80]) for h in sorted(refused)[:10])
            )
        if pushed:
            log.info("history branches pushed", hosts=len(pushed), commits=commits, remote=self.shown)
        return PushOutcome(tuple(sorted(pushed)), commits)

    # -- what is new

    async def _mirror_refs(self) -> dict[str, str]:
        _, out, _ = await self._git(
            "for-each-ref", "--format=%(objectname) %(refname)", "refs/history-mirror/"
        )
        refs: dict[str, str] = {}
        for line in out.decode().splitlines():
            sha, _, name = line.partition(" ")
            refs[name] = sha
        return refs

    async def _pending(self, refs: Mapping[str, str], head: str) -> tuple[dict[str, list[str]], set[str]]:
        """Host -> its local commits (oldest first) not on the remote yet; refused host names."""
        done = refs.get(DONE_REF)
        rows: list[tuple[str, list[str]]] | None = None
        if done is not None:
            rows = await self._log(f"{done}..{head}")
            if rows is None:
                log.warning("history mirror cursor unknown; reading the whole history", done=done)
        if rows is None:
            rows = await self._log(head)
            if rows is None:
                raise HistoryError(f"history repo {self.git_dir}: cannot list the commits of {head}")
        pending: dict[str, list[str]] = {}
        refused: set[str] = set()
        for sha, hosts in rows:
            for host in hosts:
                if not valid_host_ref(host):
                    refused.add(host)
                else:
                    pending.setdefault(host, []).append(sha)
        for host, commits in list(pending.items()):
            cursor = refs.get(SOURCE_PREFIX + host)
            if cursor in commits:  # pushed up to there (a push that stopped half-way)
                commits = commits[commits.index(cursor) + 1 :]
            if commits:
                pending[host] = commits
            else:
                del pending[host]
        return pending, refused

    async def _log(self, rev_range: str) -> list[tuple[str, list[str]]] | None:
        rc, out, _ = await self._git(
            "log", "--reverse", "--no-renames", "--format=%x01%H", "-z", "--name-only", rev_range,
            "--", "meta/", check=False,
        )  # fmt: skip
        return parse_log(out) if rc == 0 else None

    async def _read_sources(self, pending: Mapping[str, list[str]]) -> dict[str, list[SourceCommit]]:
        """The raw commits (one ``cat-file --batch``) and the host's objects in each (one
        ``cat-file --batch-check``)."""
        shas = sorted({c for commits in pending.values() for c in commits})
        _, out, _ = await self._git("cat-file", "--batch", stdin="".join(s + "\n" for s in shas).encode())
        raw: dict[str, bytes] = {}
        pos = 0
        for sha in shas:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            if len(header) != 3 or header[1] != b"commit" or header[0].decode() != sha:
                raise HistoryError(f"history repo {self.git_dir}: cannot read commit {sha}")
            size = int(header[2])
            raw[sha] = out[end + 1 : end + 1 + size]
            pos = end + 1 + size + 1
        queries = [
            (h, c, p)
            for h, commits in pending.items()
            for c in commits
            for p in (f"hosts/{h}", f"meta/{h}.json")
        ]
        _, out, _ = await self._git(
            "cat-file", "--batch-check=%(objectname) %(objecttype)",
            stdin="".join(f"{c}:{p}\n" for _, c, p in queries).encode(),
        )  # fmt: skip
        found: dict[tuple[str, str], str] = {}
        for (_, c, p), line in zip(queries, out.decode().splitlines(), strict=True):
            parts = line.split()
            if len(parts) == 2 and parts[1] != "missing" and _SHA.fullmatch(parts[0]):
                found[(c, p)] = parts[0]
        sources: dict[str, list[SourceCommit]] = {}
        for host, commits in pending.items():
            for c in commits:
                meta = found.get((c, f"meta/{host}.json"))
                if meta is None:  # a commit that removed the host's metadata: nothing to mirror
                    continue
                headers, message = split_commit(raw[c])
                src = SourceCommit(c, host, headers, message, found.get((c, f"hosts/{host}")), meta)
                sources.setdefault(host, []).append(src)
        return sources

    # -- one round: list, fetch, build, push, record

    async def _attempt(
        self, sources: Mapping[str, list[SourceCommit]], refs: Mapping[str, str]
    ) -> tuple[list[str], int]:
        remote = await self._remote_tips(set(sources))
        await self._fetch_unknown(remote, set(refs.values()))
        plans: dict[str, tuple[str, str, int]] = {}  # host -> (new tip, last source, new commits)
        objects: dict[str, GitObject] = {}
        for host, srcs in sources.items():
            mine = refs.get(TIP_PREFIX + host)
            theirs = remote.get(host)
            chain = mirror_chain(mine, srcs)
            shas = [sha for sha, _ in chain]
            if theirs is not None and theirs != mine and theirs not in shas:
                if mine is None or not await self._is_ancestor(theirs, mine):
                    chain = mirror_chain(theirs, srcs)  # another writer moved it: continue from there
                    shas = [sha for sha, _ in chain]
            start = shas.index(theirs) + 1 if theirs in shas else 0  # already there (a crash)
            for _, objs in chain[start:]:
                objects.update((o.sha, o) for o in objs)
            plans[host] = (shas[-1], srcs[-1].sha, len(shas) - start)
        await self._write(objects.values())
        to_push = {h: p[0] for h, p in plans.items() if p[2] > 0}
        accepted, failure = await self._push_refs(to_push) if to_push else (set(), None)
        done = [h for h in plans if h in accepted or h not in to_push]
        updates: list[tuple[str, str, str | None]] = []
        for host in done:
            tip, last, _ = plans[host]
            updates.append((TIP_PREFIX + host, tip, refs.get(TIP_PREFIX + host)))
            updates.append((SOURCE_PREFIX + host, last, refs.get(SOURCE_PREFIX + host)))
        if updates:  # only what the remote holds now
            await self._update_refs(updates)
        if failure is not None:
            raise HistoryError(f"history push to {self.shown} failed: {failure}")
        return done, sum(plans[h][2] for h in done)

    async def _remote_tips(self, hosts: set[str]) -> dict[str, str]:
        rc, out, err = await self._transport("ls-remote", "--heads", "--", self.remote, REMOTE_PREFIX + "*")
        if rc != 0:
            raise HistoryError(f"history push to {self.shown} failed: {self._why(err)}")
        tips: dict[str, str] = {}
        for line in out.decode("utf-8", "replace").splitlines():
            sha, _, ref = line.partition("\t")
            host = ref.removeprefix(REMOTE_PREFIX)
            if ref.startswith(REMOTE_PREFIX) and host in hosts and _SHA.fullmatch(sha):
                tips[host] = sha
        return tips

    async def _fetch_unknown(self, tips: dict[str, str], known: set[str]) -> None:
        """Fetch the remote tips this repo lacks; ``tips`` then holds what was fetched (a tip
        that moved again since the listing is the newer one: the push is then rejected and
        retried, or builds on it)."""
        check = {h: sha for h, sha in tips.items() if sha not in known}  # e.g. our own last push
        if not check:
            return
        stdin = "".join(sha + "\n" for sha in check.values()).encode()
        _, out, _ = await self._git("cat-file", "--batch-check=%(objecttype)", stdin=stdin)
        unknown = [
            h
            for (h, _), line in zip(check.items(), out.decode().splitlines(), strict=True)
            if line != "commit"
        ]
        if not unknown:
            return
        specs = [f"+{REMOTE_PREFIX}{h}:{FETCHED_PREFIX}{h}" for h in unknown]
        rc, _, err = await self._transport(
            # no auto gc: it could pack refs while a scan commits (a lock the commit calls stale)
            "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-auto-gc",
            "--", self.remote, *specs,
        )  # fmt: skip
        if rc != 0:
            raise HistoryError(f"history fetch from {self.shown} failed: {self._why(err)}")
        refs = await self._mirror_refs()
        for h in unknown:
            fetched = refs.get(FETCHED_PREFIX + h)
            if fetched is None:
                raise HistoryError(f"history fetch from {self.shown}: {REMOTE_PREFIX}{h} vanished")
            tips[h] = fetched
        log.info("history branches fetched from the remote", hosts=len(unknown))

    async def _is_ancestor(self, ancestor: str, descendant: str) -> bool:
        rc, _, _ = await self._git("merge-base", "--is-ancestor", ancestor, descendant, check=False)
        return rc == 0

    async def _write(self, objects: Iterable[GitObject]) -> None:
        """Write the objects (one ``hash-object`` per kind) and check git hashed them as we did."""
        by_kind: dict[str, list[GitObject]] = {}
        for o in objects:
            by_kind.setdefault(o.kind, []).append(o)
        if not by_kind:
            return
        tmp = Path(tempfile.mkdtemp(prefix="reconciler-mirror-", dir=self.git_dir))
        try:
            for kind in ("tree", "commit"):
                objs = by_kind.get(kind, [])
                if not objs:
                    continue
                paths = []
                for i, o in enumerate(objs):
                    path = tmp / f"{kind}{i}"
                    path.write_bytes(o.body)
                    paths.append(path)
                _, out, _ = await self._git(
                    "hash-object", "-w", "-t", kind, "--stdin-paths",
                    stdin=b"".join(str(p).encode() + b"\n" for p in paths),
                )  # fmt: skip
                if out.decode().split() != [o.sha for o in objs]:
                    raise HistoryError(
                        f"history repo {self.git_dir}: git hashed a mirrored {kind} differently"
                    )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _push_refs(self, tips: Mapping[str, str]) -> tuple[set[str], str | None]:
        """Push each host's new tip (never forced): the hosts the remote accepted, and why the
        push failed otherwise. A ref rejected as not a fast-forward (another writer pushed it
        meanwhile) is no failure: it is left for the next attempt."""
        specs = [f"{tip}:{REMOTE_PREFIX}{host}" for host, tip in sorted(tips.items())]
        rc, out, err = await self._transport("push", "--porcelain", "--", self.remote, *specs)
        accepted: set[str] = set()
        other: dict[str, str] = {}
        contended = 0
        for line in out.decode("utf-8", "replace").splitlines():
            fields = line.split("\t")
            if len(fields) < 3 or ":" not in fields[1]:
                continue
            host = fields[1].split(":", 1)[1].removeprefix(REMOTE_PREFIX)
            if host not in tips:
                continue
            if fields[0] in (" ", "*", "="):
                accepted.add(host)
            elif any(why in fields[2] for why in _CONTENDED):
                contended += 1
            else:
                other[host] = fields[2]
        if other:
            return accepted, "; ".join(
                f"{REMOTE_PREFIX}{h}: {w[:200]}" for h, w in sorted(other.items())[:10]
            )
        if rc != 0 and not contended:
            return accepted, self._why(err)
        return accepted, None

    async def _update_refs(self, updates: Sequence[tuple[str, str, str | None]]) -> None:
        lines = "".join(f"update {ref} {new} {old or ZERO}\n" for ref, new, old in updates)
        await self._git("update-ref", "--stdin", stdin=f"start\n{lines}prepare\ncommit\n".encode())

    # -- transport

    async def _transport(self, *args: str) -> tuple[int, bytes, bytes]:
        return await self._git(*args, env=self._env, check=False)

    def _why(self, err: bytes) -> str:
        return first_line(err).replace(self.remote, self.shown)
