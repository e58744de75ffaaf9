"""One daemon per state directory (daemon/process.py, ``daemon.lock``): a second process is
refused while the first holds the lock, and the lock is free again once that process is gone
(a crash included: the kernel drops a flock with the process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.daemon.process import StateDirLocked, lock_state_dir

HOLDER = """
import sys, time
from pathlib import Path
from reconciler.daemon.process import lock_state_dir
lock_state_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_daemon_on_the_same_state_dir_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert (state / "daemon.lock").read_text().strip() == str(holder.pid)
        with pytest.raises(StateDirLocked, match="another reconciler daemon uses this state directory"):
            lock_state_dir(state)
    finally:
        holder.kill()  # a crash: no clean-up code runs
        holder.wait(timeout=10)
    deadline = time.monotonic() + 5
    while True:
        try:
            fd = lock_state_dir(state)
            break
        except StateDirLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        assert (state / "daemon.lock").read_text().strip() == str(os.getpid())
    finally:
        os.close(fd)
