"""Rendering out of the caller's process, under limits: ``render_bounded`` and ``RenderWorker``.

    fleet, hosts, limits --(pipe)--> worker process (reconciler.domains.render_worker)
        <-- per host: Desired | render error ; or a broken bound (the job stops)

The daemon keeps one ``RenderWorker`` (one warm process, one job per commit, replaced after a
broken bound or a crash); a command makes one for its run. The caller's event loop only
waits on a pipe: a template that loops forever or allocates gigabytes costs the worker, which
is killed by its PID at the deadline (``timeout`` + a short grace), on ``close()`` (daemon
shutdown) and when the awaiting task is cancelled.

Results: ``dict[host, Desired | RenderError]`` (an ordinary render error stays the error of
its host, as in the engine) or ``RenderRejected`` (a bound was broken: the whole commit is
refused; the reason names the host and, when the worker could tell, the template file and
line). The worker's answers are unpickled with an allow-list of classes (the resource kinds of
``reconciler.kinds.resources``): a worker that a template subverted can send only data.
"""

from __future__ import annotations

import asyncio
import enum
import io
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import reconciler
from reconciler.domains.render_limits import RenderLimits, format_size
from reconciler.domains.render_worker import HEADER, encode
from reconciler.errors import RenderError, Transient
from reconciler.kinds import resources
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger

log = get_logger(__name__)

KILL_GRACE = 2.0  # seconds past the worker's own timer before it is killed from outside
FRAME_OVERHEAD = 1 << 20
READ_BUFFER = 4 << 20  # keep reading the pipe while answers arrive (asyncio pauses at 2x this)

RenderResults = dict[str, Desired | RenderError]


@dataclass(frozen=True)
class RenderRejected:
    """A bound was broken: nothing of this render may be used."""

    reason: str  # one line: host, template file and line when known, the limit and its setting
    limit: str  # timeout | memory | file-size | host-size | sandbox | worker


class RenderAborted(Transient):
    """The render was stopped from outside (shutdown): try again later, refuse nothing."""


class _WorkerGone(Exception):
    pass


_ALLOWED = {
    name: obj
    for name, obj in vars(resources).items()
    if isinstance(obj, type) and obj.__module__ == resources.__name__
}


def _enum_member(cls: Any, name: Any) -> Any:
    """How some Python builds (Debian 12's 3.11.2) pickle an enum member: ``getattr(Enum, NAME)``.
    Only a member of an allowed enum, never a general attribute lookup (that would let a
    subverted worker reach any callable)."""
    if (
        isinstance(cls, type)
        and issubclass(cls, enum.Enum)
        and _ALLOWED.get(cls.__name__) is cls
        and isinstance(name, str)
        and name in cls.__members__
    ):
        return cls[name]
    raise pickle.UnpicklingError("the render worker sent a forbidden attribute lookup")


class _AnswerUnpickler(pickle.Unpickler):
    """Only the resource dataclasses and enums of reconciler.kinds.resources, and builtin data."""

    def find_class(self, module: str, name: str) -> Any:
        if module == resources.__name__ and name in _ALLOWED:
            return _ALLOWED[name]
        if module == "builtins" and name in ("frozenset", "set"):
            return frozenset if name == "frozenset" else set
        if module == "builtins" and name == "getattr":
            return _enum_member
        raise pickle.UnpicklingError(f"the render worker sent a forbidden type {module}.{name}")


def _decode(data: bytes) -> tuple[Any, ...]:
    message = _AnswerUnpickler(io.BytesIO(data)).load()
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise pickle.UnpicklingError("the render worker sent a malformed answer")
    return message


def _worker_env() -> dict[str, str]:
    """No daemon settings (secrets such as the SMTP password are published as RECONCILER_*),
    and the same reconciler package as ours first on the path (ours may come from the current
    directory, which ``-P`` keeps off the worker's path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    ours = str(Path(reconciler.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [ours, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    )
    return env


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


class RenderWorker:
    """One warm worker process for a sequence of render jobs (one at a time)."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False  # the current process said it started (imports done)
        self._lock = asyncio.Lock()
        self._closing = False
        self.jobs = 0  # rendered jobs (tests, metrics)
        self.spawned = 0  # worker processes started

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Start the process now (it imports while the caller does other work)."""
        if self._closing:
            raise RenderAborted("the render worker is shutting down")
        if self._proc is not None and self._proc.returncode is None:
            return
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "reconciler.domains.render_worker",
                str(self.limits.memory), str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=_worker_env(), cwd="/", limit=READ_BUFFER,
            )  # fmt: skip
            self._ready = False
        except OSError as exc:
            raise RenderAborted(f"cannot start the render worker: {exc.strerror or exc}") from None
        self.spawned += 1

    async def close(self) -> None:
        """Kill the worker (by its PID); a render in progress ends with ``RenderAborted``."""
        self._closing = True
        await self._kill()

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        await proc.wait()

    async def render(self, fleet: Any, hosts: Sequence[str]) -> RenderResults | RenderRejected:
        names = list(dict.fromkeys(hosts))
        async with self._lock:
            # A worker that died while idle (killed, or replaced too late) must not refuse a
            # commit: one retry with a new process when it died before answering anything.
            for attempt in (1, 2):
                await self.start()
                results: RenderResults = {}
                try:
                    rejected = await self._attempt(fleet, names, results)
                except (_WorkerGone, ConnectionError) as exc:
                    ready, code = self._ready, await self._reap()
                    if self._closing:
                        raise RenderAborted("rendering stopped: the render worker was shut down") from None
                    if not ready:  # not the commit's fault: an install or environment problem
                        raise RenderAborted(
                            f"the render worker could not start ({_describe_exit(code)}); see the log"
                        ) from None
                    if attempt == 1 and not results:
                        log.info("render worker ended before answering; starting a new one", exit=code)
                        continue
                    await self._replace()
                    detail = f": {exc}" if str(exc) else ""
                    return RenderRejected(
                        f"the render worker ended ({_describe_exit(code)}{detail}) while rendering host "
                        f"{_current(names, results)}; a template may need more than "
                        f"{format_size(self.limits.memory)} (render.memory)",
                        "worker",
                    )
                self.jobs += 1
                if rejected is not None:
                    await self._replace()  # a process that hit a bound is never reused
                    return rejected
                return results
        raise AssertionError("unreachable")

    async def _attempt(self, fleet: Any, names: list[str], results: RenderResults) -> RenderRejected | None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            async with asyncio.timeout(self.limits.timeout + KILL_GRACE):
                proc.stdin.write(encode(("render", fleet, names, self.limits)))
                await proc.stdin.drain()
                return await self._collect(proc, results)
        except TimeoutError:
            return RenderRejected(
                f"rendering took longer than {self.limits.timeout:g} s (render.timeout); "
                f"stopped while rendering host {_current(names, results)}",
                "timeout",
            )
        except pickle.UnpicklingError as exc:
            return RenderRejected(f"rendering refused: {exc}", "worker")
        except (_WorkerGone, ConnectionError):
            raise
        except BaseException:  # cancelled (or a bug): the job cannot be resumed
            await self._kill()
            raise

    async def _replace(self) -> None:
        """Kill the worker and start the next one now, so the next commit finds it warm."""
        await self._kill()
        if not self._closing:
            try:
                await self.start()
            except RenderAborted as exc:  # the next render tries again
                log.warning("cannot start the next render worker", error=str(exc))

    async def _collect(
        self, proc: asyncio.subprocess.Process, results: RenderResults
    ) -> RenderRejected | None:
        assert proc.stdout is not None
        limit = self.limits.max_host_bytes * 2 + FRAME_OVERHEAD
        while True:
            try:
                header = await proc.stdout.readexactly(HEADER)
                size = int.from_bytes(header, "big")
                if size > limit:
                    raise pickle.UnpicklingError(f"the render worker sent a frame of {size} bytes")
                message = _decode(await proc.stdout.readexactly(size))
            except asyncio.IncompleteReadError:
                raise _WorkerGone() from None
            tag = message[0]
            if tag == "ready" and len(message) == 1:
                self._ready = True
            elif tag == "end" and len(message) == 1:
                return None
            elif tag == "ok" and len(message) == 3 and isinstance(message[2], Desired):
                results[str(message[1])] = message[2]
            elif tag == "error" and len(message) == 3:
                results[str(message[1])] = RenderError(str(message[2]))
            elif tag == "limit" and len(message) == 4:
                return RenderRejected(str(message[3]), str(message[2]))
            else:
                raise pickle.UnpicklingError(f"the render worker sent an unknown answer {tag[:20]!r}")

    async def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            async with asyncio.timeout(KILL_GRACE):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            return await proc.wait()


def _current(names: Sequence[str], results: Mapping[str, object]) -> str:
    return next((n for n in names if n not in results), names[-1] if names else "?")


async def render_bounded(
    fleet: Any, hosts: Sequence[str], limits: RenderLimits
) -> RenderResults | RenderRejected:
    """Render ``hosts`` of ``fleet`` in a fresh worker under ``limits`` (for commands and for
    ``validate``): ``{host: Desired | RenderError}`` or ``RenderRejected``."""
    worker = RenderWorker(limits)
    try:
        return await worker.render(fleet, hosts)
    finally:
        await worker.close()


def render_bounded_sync(
    fleet: Any, hosts: Sequence[str], limits: RenderLimits
) -> RenderResults | RenderRejected:
    """``render_bounded`` for code that runs no event loop."""
    return asyncio.run(render_bounded(fleet, hosts, limits))
