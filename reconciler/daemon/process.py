"""The daemon process's hold on the machine: one daemon per state directory (an exclusive lock
file holding its pid) and enough open files for one socket per host."""

from __future__ import annotations

import fcntl
import os
import resource
from pathlib import Path

from reconciler.errors import Terminal


class StateDirLocked(Terminal):
    pass


def lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(f"{state_dir}: another reconciler daemon uses this state directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def raise_fd_limit() -> None:
    """One socket per host: a 1,000-host fleet passes systemd's default soft limit of 1,024 open
    files; take the hard limit (the soft one is only a default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
