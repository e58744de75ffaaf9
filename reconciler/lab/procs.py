"""Process helpers that never touch a process the lab did not start.

A process is identified by its PID *and* its start time (field 22 of /proc/PID/stat), so a
recycled PID is never mistaken for ours; zombies count as dead.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ...": comm may hold spaces or parentheses; split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state), rest[19] is field 22 (starttime)


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def is_alive(pid: int, started: int | None = None) -> bool:
    """True when PID runs (not a zombie) and, if given, started at ``started``."""
    if pid <= 0:
        return False
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [int(x) for x in text.split()]


def kill_verified(pid: int, started: int | None, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` only if PID is still the process that started at ``started``."""
    if not is_alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(pid: int) -> None:
    """Collect a child of ours that died, so it does not stay a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_dead(pids: Iterable[tuple[int, int | None]], timeout: float = 10.0) -> list[int]:
    """Wait until none of the (pid, start time) pairs is alive; return those still alive."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        for pid, _ in pending:
            reap(pid)
        pending = [(p, s) for p, s in pending if is_alive(p, s)]
        if not pending or time.monotonic() > deadline:
            return [p for p, _ in pending]
        time.sleep(0.02)


def find_processes(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (a lab's unique state path)."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        if any(marker in arg for arg in cmdline(pid)):
            found.append(pid)
    return found
