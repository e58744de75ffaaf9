"""The render worker process: ``python -P -m reconciler.domains.render_worker MEMORY PARENT_PID``.

It renders fleets for its parent (``reconciler.domains.bounded_render``) under bounds the parent
cannot enforce from outside without killing it:

- its address space is capped (RLIMIT_AS = MEMORY bytes), so a template that allocates
  gigabytes fails at once with a MemoryError instead of taking the machine's memory;
- each job (one commit: a fleet and the hosts to render) has a wall-time budget; an interval
  timer interrupts a template that loops past it, and the error names the template line;
- each host's output is checked against the per-file and per-host caps (templates stop
  generating at the per-file cap, ``reconciler.domains.templating.output_limit``);
- it dies with its parent (PR_SET_PDEATHSIG), writes no core file, and never sees the
  daemon's settings (the parent passes no ``RECONCILER_*`` variable).

Wire format, both ways: frames of an 8-byte big-endian length and a pickle. Once started, the
worker says ``("ready",)``. The parent sends ``("render", fleet, hosts, limits)``; the worker
answers one frame per host, in order:
``("ok", host, Desired)``, ``("error", host, message)`` (an ordinary render error of that host)
or ``("limit", host, kind, message)`` (a broken bound: the job stops there and the worker
exits), then ``("end",)``. The parent unpickles answers with an allow-list of classes
(``reconciler.domains.bounded_render``): the worker renders untrusted templates, so what it says is
treated as data only.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import fcntl
import io
import os
import pickle
import resource
import signal
import sys
from collections.abc import Iterator
from types import FrameType, MappingProxyType
from typing import IO, Any

MAX_JOB_BYTES = 1 << 30
PIPE_SIZE = 1 << 20  # the unprivileged maximum (fs.pipe-max-size) by default
HEADER = 8
PR_SET_PDEATHSIG = 1


def encode(message: object) -> bytes:
    """One frame. Fleet mappings are read-only proxies, which pickle cannot handle by itself:
    they travel as dicts and come back as proxies (``reconciler.fleet.model.frozen_map``)."""
    from reconciler.fleet.model import frozen_map

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {  # a table of this pickler only, as documented
        **copyreg.dispatch_table,
        MappingProxyType: lambda m: (frozen_map, (dict(m),)),
    }
    pickler.dump(message)
    data = buf.getvalue()
    return len(data).to_bytes(HEADER, "big") + data


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class _Job:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.rendering = False  # the timer may interrupt only a render, never a frame write
        self.expired = False


_current: _Job | None = None


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    from reconciler.domains.render_limits import RenderLimitExceeded

    job = _current
    if job is None:
        return
    job.expired = True
    if job.rendering:
        raise RenderLimitExceeded(
            f"rendering took longer than {job.timeout:g} s (render.timeout)", limit="timeout"
        )


@contextlib.contextmanager
def _rendering(job: _Job) -> Iterator[None]:
    job.rendering = True
    try:
        yield
    finally:
        job.rendering = False


def _sizes(host: str, desired: Any, limits: Any) -> None:
    """The per-file and per-host caps over everything the host renders (not only templates)."""
    from reconciler.domains.render_limits import RenderLimitExceeded, format_size

    total = 0
    items = [(f.path, len(f.content)) for f in desired.files]
    if desired.firewall is not None:
        items.append((desired.firewall.persistent_path, len(desired.firewall.rules_v4.encode())))
    for path, size in items:
        if size > limits.max_file_bytes:
            raise RenderLimitExceeded(
                f"host {host}: {path} is {format_size(size)}, more than {format_size(limits.max_file_bytes)} "
                "per file (render.max_file_bytes)",
                limit="file-size",
            )
        total += size
    if total > limits.max_host_bytes:
        raise RenderLimitExceeded(
            f"host {host}: {format_size(total)} rendered, more than {format_size(limits.max_host_bytes)} "
            "per host (render.max_host_bytes)",
            limit="host-size",
        )


def run_job(fleet: Any, hosts: list[str], limits: Any, out: IO[bytes]) -> bool:
    """Render ``hosts`` one by one, answering a frame per host. False after a broken bound."""
    global _current
    from reconciler.domains.render import render_host
    from reconciler.domains.render_limits import RenderLimitExceeded, format_size
    from reconciler.domains.templating import output_limit
    from reconciler.errors import RenderError

    def send(message: object) -> None:
        out.write(encode(message))
        out.flush()

    job = _current = _Job(limits.timeout)
    signal.setitimer(signal.ITIMER_REAL, max(limits.timeout, 0.001))
    ok = True
    try:
        with output_limit(limits.max_file_bytes):
            for name in hosts:
                if job.expired:
                    send(
                        (
                            "limit",
                            name,
                            "timeout",
                            f"rendering took longer than {limits.timeout:g} s (render.timeout)",
                        )
                    )
                    ok = False
                    break
                try:
                    with _rendering(job):
                        desired = render_host(fleet, fleet.host(name))
                    _sizes(name, desired, limits)
                except RenderLimitExceeded as exc:
                    text = str(exc) if name in str(exc) else f"host {name}: {exc}"
                    text = text.replace("(render.memory)", f"(render.memory = {format_size(limits.memory)})")
                    send(("limit", name, exc.limit, text))
                    ok = False
                    break
                except MemoryError:
                    memory = format_size(limits.memory)
                    send(
                        (
                            "limit",
                            name,
                            "memory",
                            f"host {name}: rendering ran out of memory (render.memory = {memory})",
                        )
                    )
                    ok = False
                    break
                except RenderError as exc:
                    send(("error", name, str(exc)))
                except KeyError:
                    send(("error", name, f"host {name}: not in the fleet"))
                except Exception as exc:  # noqa: BLE001 - a bug renders one host as an error, like the engine
                    send(("error", name, f"host {name}: internal render error: {type(exc).__name__}: {exc}"))
                else:
                    send(("ok", name, desired))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _current = None
    send(("end",))
    return ok


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def main(argv: list[str]) -> int:
    memory, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The protocol owns the original stdout; anything printed by mistake goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    with contextlib.suppress(OSError):  # a host's answers in one write, not in 64 KiB pieces
        fcntl.fcntl(out.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    inp = os.fdopen(0, "rb", buffering=0)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    import reconciler.domains.render  # noqa: F401  - import before the first job, not inside its time

    out.write(encode(("ready",)))  # the parent tells a worker that cannot start from a bad commit
    out.flush()
    while True:
        header = _read_exactly(inp, HEADER)
        if header is None:
            return 0
        size = int.from_bytes(header, "big")
        if size > MAX_JOB_BYTES:
            return 2
        data = _read_exactly(inp, size)
        if data is None:
            return 0
        kind, fleet, hosts, limits = pickle.loads(data)  # noqa: S301 - from the parent, which is trusted
        if kind != "render":
            return 2
        del data
        if not run_job(fleet, list(hosts), limits, out):
            return 0  # a broken bound: never reuse a process that hit one
        del fleet


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
