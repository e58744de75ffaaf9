"""The one git layer: the fleet source mirror (daemon/source.py) and the /etc history repo
(drift/history.py) both go through ``GitRepo``.

- Every git process (GitPython's and ours) runs in an isolated environment: no ``GIT_*`` or
  ``RECONCILER_*`` variable of ours (secrets) reaches it, global and system config are ignored
  (nothing there, such as a credential helper, an allowed-signers file or hooks, changes what we
  trust), no terminal prompt, ``LC_ALL=C`` (messages we match on are stable).
- Reads of objects and refs (resolve a revision, read a blob of a commit, a commit's header and
  message, ancestry) use GitPython: one persistent ``git cat-file --batch`` per repository
  instead of one process per read. GitPython is blocking and not thread-safe: its calls run in
  a worker thread (``asyncio.to_thread``), one at a time per repository.
- Subprocess git (``GitRepo.run``: argv lists only, output capped, a time-out) stays where
  GitPython has no API (``verify-commit`` signature checks; ``update-ref NEW OLD``, the
  compare-and-swap the history relies on; ``archive`` with a size cap; ``fetch`` and ``push``
  with our transport settings) and for the history's plumbing writes (``hash-object``,
  ``update-index``, ``mktree``, ``commit-tree``: measured, see docs/ARCHITECTURE.md "Git layer").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from reconciler.errors import ReconcilerError, Transient

if TYPE_CHECKING:  # GitPython costs ~0.4 s to import: only code that reads a repo pays it
    import git

T = TypeVar("T")

MAX_OUTPUT = 64 << 20
_KEEP = ("PATH", "HOME", "LANG", "TMPDIR", "SSH_AUTH_SOCK")
ISOLATION = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "SSH_ASKPASS": "/bin/false",
    "LC_ALL": "C",
}


class GitError(Transient):
    """git failed or timed out (a network, server or disk problem): retried with backoff."""


class UnreadableObject(ReconcilerError):
    """An object that is not in the repo, or that GitPython cannot parse (a hostile commit)."""


class OutputTooLarge(Exception):
    """A git command wrote more than its ``max_output``; the process was killed."""


def isolated_env(extra: Mapping[str, str] | None = None, *, inherit: bool = True) -> dict[str, str]:
    """The environment of every git process. ``inherit``: keep our environment minus ``GIT_*``
    and ``RECONCILER_*`` (the source mirror: ssh needs more than PATH and HOME); otherwise only
    PATH, HOME, LANG, TMPDIR and SSH_AUTH_SOCK (the history repo)."""
    if inherit:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "RECONCILER_"))}
    else:
        env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.update(ISOLATION)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class GitResult:
    code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class CommitObject:
    """A commit as read from the object database (never through a work tree)."""

    sha: str
    parents: tuple[str, ...]
    message: str
    signature: str  # the raw ``gpgsig`` header ("" if unsigned)


def first_line(data: bytes) -> str:
    """The first meaningful line of git's stderr (no hints), for an error message."""
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("hint:"):
            return line[:300]
    return "no message"


def redact_url(url: str) -> str:
    """Drop any ``user:password@`` from an http(s) URL before it is shown or logged."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1***@", url)


def init_bare(path: Path, *, initial_branch: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """``git init --bare`` (GitPython's command wrapper, isolated environment)."""
    import git

    cmd = git.Git()
    cmd.update_environment(**(dict(env) if env is not None else isolated_env(inherit=False)))
    args = ["--quiet", "--bare"]
    if initial_branch:
        args.append(f"--initial-branch={initial_branch}")
    try:
        cmd.init(*args, str(path))
    except git.GitCommandError as err:
        raise GitError(f"git init {path} failed: {first_line(_as_bytes(err.stderr))}") from None


class GitRepo:
    """One repository (bare or a ``.git`` directory). ``error``: the exception class a failed or
    timed-out command raises (callers give their own, e.g. the history's ``HistoryError``)."""

    def __init__(
        self,
        git_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        error: Callable[[str], ReconcilerError] = GitError,
    ) -> None:
        self.git_dir = git_dir
        self.env = dict(env) if env is not None else isolated_env()
        self._error = error
        self._repo: git.Repo | None = None
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ subprocess git

    async def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        config: Iterable[tuple[str, str]] = (),
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        max_output: int = MAX_OUTPUT,
    ) -> GitResult:
        """``git --git-dir=DIR [-c k=v]... ARGS``; raises ``OutputTooLarge`` past ``max_output``
        and the repo's error on a time-out. A non-zero exit is returned, not raised."""
        argv = ["git", f"--git-dir={self.git_dir}"]
        for key, value in config:
            argv += ["-c", f"{key}={value}"]
        argv += list(args)
        run_env = {**self.env, **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=run_env,
            start_new_session=True,  # its own process group: a time-out also ends ssh or a hook
        )
        try:
            stdout, stderr = await asyncio.wait_for(_communicate_capped(proc, stdin, max_output), timeout)
        except (TimeoutError, asyncio.CancelledError, OutputTooLarge) as exc:
            _kill_group(proc)
            with contextlib.suppress(TimeoutError):  # never hang on a lost exit notification
                await asyncio.wait_for(proc.wait(), 10)
            if isinstance(exc, TimeoutError):
                raise self._error(f"git {args[0]} timed out after {timeout:.0f}s") from None
            raise
        code = await proc.wait()
        return GitResult(code, stdout, stderr)

    async def check(
        self,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        max_output: int = MAX_OUTPUT,
    ) -> bytes:
        """``run`` that raises the repo's error on a non-zero exit; returns stdout."""
        res = await self.run(args, timeout=timeout, env=env, stdin=stdin, max_output=max_output)
        if res.code != 0:
            why = first_line(res.stderr)
            raise self._error(f"{self.git_dir}: git {args[0]} failed (exit {res.code}): {why}")
        return res.stdout

    # ------------------------------------------------------------ GitPython reads

    def _open(self) -> git.Repo:
        if self._repo is None:
            import git

            self._repo = git.Repo(self.git_dir)
        # GitPython starts its processes from a copy of os.environ plus its own variables: blank
        # what ours would leak (secrets the daemon published, GIT_* of the caller), every time
        # (os.environ may have changed since the last call)
        leaked = {k: "" for k in os.environ if k.startswith(("GIT_", "RECONCILER_")) and k not in self.env}
        self._repo.git.update_environment(**leaked, **self.env, GIT_DIR=str(self.git_dir))
        return self._repo

    async def _call(self, fn: Callable[[git.Repo], T]) -> T:
        def locked() -> T:
            with self._mutex:
                return fn(self._open())

        return await asyncio.to_thread(locked)

    async def resolve(self, rev: str, kind: str = "commit") -> str | None:
        """The object id ``rev`` names, peeled to ``kind``; None if there is none."""
        from git.exc import BadName, BadObject

        def look(repo: git.Repo) -> str | None:
            try:
                return str(repo.rev_parse(f"{rev}^{{{kind}}}").hexsha)
            except (BadName, BadObject, ValueError, IndexError, KeyError):
                return None

        return await self._call(look)

    async def exists(self, rev: str) -> bool:
        return await self.resolve(rev) is not None

    async def read_blob(self, commit: str, path: str) -> bytes | None:
        """The bytes of ``path`` in ``commit``'s tree; None if the tree has no such file.
        Raises the repo's error when ``commit`` is not a commit of this repo.

        Only for trees whose names we wrote: GitPython refuses to parse a tree holding a name
        it deems unsafe (an HFS alias of ``.git``, which git on Linux stores), so a tree of
        host-chosen names is read with ``run`` (ls-tree, rev-parse), never here."""
        from git.exc import BadName, BadObject

        def read(repo: git.Repo) -> bytes | None:
            try:
                tree = repo.rev_parse(f"{commit}^{{tree}}")
            except (BadName, BadObject, ValueError, IndexError):
                raise self._error(f"{self.git_dir}: no commit {commit}") from None
            try:
                blob = tree / path
            except KeyError:
                return None
            if blob.type != "blob":
                return None
            return bytes(blob.data_stream.read())

        return await self._call(read)

    async def commit(self, rev: str) -> CommitObject:
        """A commit's parents, message and signature header; ``UnreadableObject`` if it is not in
        the repo or does not parse."""
        from git.exc import BadName, BadObject

        def read(repo: git.Repo) -> CommitObject:
            try:
                c = repo.commit(rev)
                return CommitObject(
                    c.hexsha,
                    tuple(p.hexsha for p in c.parents),
                    c.message if isinstance(c.message, str) else c.message.decode("utf-8", "replace"),
                    c.gpgsig or "",
                )
            except (BadName, BadObject, ValueError, IndexError, TypeError, AttributeError) as err:
                raise UnreadableObject(f"{self.git_dir}: cannot read commit {rev}: {err}") from None

        return await self._call(read)

    async def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether ``ancestor`` is ``descendant`` or one of its ancestors (merge-base)."""
        res = await self.run(["merge-base", "--is-ancestor", ancestor, descendant])
        return res.code == 0

    def close(self) -> None:
        """End GitPython's persistent ``cat-file`` processes (reopened on the next read)."""
        with self._mutex:
            if self._repo is not None:
                self._repo.close()
                self._repo = None


async def _communicate_capped(
    proc: asyncio.subprocess.Process, stdin: bytes | None, limit: int
) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    out_stream, err_stream = proc.stdout, proc.stderr

    async def feed() -> None:
        if stdin is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            proc.stdin.close()

    async def read_out() -> bytes:
        buf = bytearray()
        while chunk := await out_stream.read(1 << 16):
            buf += chunk
            if len(buf) > limit:
                raise OutputTooLarge(limit)
        return bytes(buf)

    async def read_err() -> bytes:
        data = await err_stream.read(1 << 16)
        while await err_stream.read(1 << 16):  # drain, keep the first 64 KiB
            pass
        return data

    feeding = asyncio.ensure_future(feed())
    out_task, err_task = asyncio.ensure_future(read_out()), asyncio.ensure_future(read_err())
    tasks = (feeding, out_task, err_task)
    try:
        await asyncio.gather(*tasks)
    finally:  # on a cap or a cancellation, no reader is left behind
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out_task.result(), err_task.result()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if proc.returncode is None:
            proc.kill()


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    return str(data).encode("utf-8", "replace")
