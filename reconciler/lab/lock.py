"""The machine-wide lock: one lab at a time owns 192.0.2.0/24 (and the bridge address .254).

``flock`` on ``LAB_ROOT/.lock`` guards ``owner.json`` (prefix, owner PID and its start time,
and whether the lab was left running on purpose by ``reconciler lab up``). The flock is held
only while reading or writing the record, so a lab can outlive the process that made it.
An owner is alive while its PID (same start time) runs; a detached lab is alive while one of
its hosts runs. A dead owner's lock is broken after its leftovers are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.lab import procs
from reconciler.lab.model import LabError
from reconciler.lab.state import LAB_ROOT, atomic_write, ensure_root, load_state
from reconciler.log import get_logger

log = get_logger(__name__)
OWNER_FILE = "owner.json"
QUEUE_FILE = "waiters.json"


@dataclass(frozen=True)
class Owner:
    prefix: str
    pid: int
    start: int | None
    detached: bool = False


@contextlib.contextmanager
def flocked(path: Path, timeout: float, *, poll: float, held: str = "held") -> Iterator[None]:
    """An exclusive flock on ``path`` (created 0600), polled every ``poll`` s for up to
    ``timeout`` s, else LabError ("PATH: <held> for more than N s"). Closing releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"{path}: {held} for more than {timeout:.0f}s") from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _flocked(timeout: float = 60.0) -> Iterator[None]:
    ensure_root()
    with flocked(LAB_ROOT / ".lock", timeout, poll=0.05):
        yield


def read_owner() -> Owner | None:
    try:
        data = json.loads((LAB_ROOT / OWNER_FILE).read_text())
        return Owner(str(data["prefix"]), int(data["pid"]), data.get("start"), bool(data.get("detached")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return Owner(prefix="", pid=0, start=None)  # unreadable: treated as dead


def _write_owner(owner: Owner) -> None:
    atomic_write(LAB_ROOT / OWNER_FILE, json.dumps(vars(owner), sort_keys=True) + "\n")


def owner_alive(owner: Owner) -> bool:
    if not owner.prefix:
        return False
    if procs.is_alive(owner.pid, owner.start):
        return True
    if owner.detached:
        try:
            state = load_state(owner.prefix)
        except LabError:
            return False
        return state is not None and any(procs.is_alive(h.pid, h.pid_start) for h in state.hosts)
    return False


def _read_queue() -> list[tuple[int, int | None]]:
    try:
        data = json.loads((LAB_ROOT / QUEUE_FILE).read_text())
        return [(int(e[0]), e[1]) for e in data]
    except (FileNotFoundError, ValueError, TypeError, IndexError):
        return []


def _write_queue(queue: list[tuple[int, int | None]]) -> None:
    atomic_write(LAB_ROOT / QUEUE_FILE, json.dumps([list(e) for e in queue]) + "\n")


def _queue_turn(me: tuple[int, int | None], *, join: bool) -> bool:
    """Keep the waiters' queue (FIFO, dead waiters dropped); True when ``me`` is first."""
    queue = [e for e in _read_queue() if procs.is_alive(e[0], e[1])]
    if me not in queue and join:
        queue.append(me)
    _write_queue(queue)
    return bool(queue) and queue[0] == me


def waiters() -> list[int]:
    """PIDs of the live processes waiting for the lab lock, first in line first."""
    return [pid for pid, start in _read_queue() if procs.is_alive(pid, start)]


def _leave_queue(me: tuple[int, int | None]) -> None:
    _write_queue([e for e in _read_queue() if e != me and procs.is_alive(e[0], e[1])])


def acquire(prefix: str, break_dead: Callable[[str], object], timeout: float = 600.0) -> None:
    """Make this process the owner for ``prefix``; wait (first come, first served) while a
    live lab holds the lock; break the lock of a dead owner after removing its leftovers."""
    me = Owner(prefix, os.getpid(), procs.start_time(os.getpid()))
    ticket = (me.pid, me.start)
    deadline = time.monotonic() + timeout
    announced = False
    try:
        while True:
            with _flocked():
                cur = read_owner()
                if cur is not None and cur.prefix and cur.pid == me.pid and not cur.detached:
                    raise LabError(f"this process already owns lab {cur.prefix}: down it before a new one")
                first = _queue_turn(ticket, join=True)
                if first and (cur is None or not owner_alive(cur)):
                    if cur is not None and cur.prefix:
                        log.warning("lab.lock.break", dead_prefix=cur.prefix, dead_pid=cur.pid)
                        break_dead(cur.prefix)
                    _write_owner(me)
                    return
            if not announced:
                log.info(
                    "lab.lock.wait",
                    owner_prefix=cur.prefix if cur else None,
                    owner_pid=cur.pid if cur else None,
                )
                announced = True
            if time.monotonic() > deadline:
                who = f"another lab ({cur.prefix}, pid {cur.pid})" if cur else "earlier waiters"
                hint = f"; run `reconciler lab down --prefix {cur.prefix}` if it is stale" if cur else ""
                raise LabError(f"{who} kept 192.0.2.0/24 busy for {timeout:.0f}s{hint}")
            time.sleep(0.25)
    finally:
        with _flocked():
            _leave_queue(ticket)


def set_detached(prefix: str) -> None:
    """Keep the lock after this process exits (``reconciler lab up``)."""
    with _flocked():
        cur = read_owner()
        if cur is None or cur.prefix != prefix:
            raise LabError(f"lab {prefix} does not own the lab lock")
        _write_owner(Owner(cur.prefix, cur.pid, cur.start, detached=True))


def release(prefix: str) -> None:
    with _flocked():
        cur = read_owner()
        if cur is not None and cur.prefix == prefix:
            (LAB_ROOT / OWNER_FILE).unlink(missing_ok=True)
