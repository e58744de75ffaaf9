"""tests/leftovers.py (the end-of-suite check of .ci/run): a process the command left running
is reported, with its command line, and fails the run; a clean command passes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "leftovers.py"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RECONCILER_LEFTOVER_GRACE="0.5")
    return subprocess.run([sys.executable, str(SCRIPT), "--", *argv], capture_output=True, text=True, env=env)


def test_a_clean_command_passes_with_its_own_status() -> None:
    assert run("true").returncode == 0
    assert run("sh", "-c", "exit 3").returncode == 3


def test_a_detached_process_left_behind_fails_the_run() -> None:
    res = run("sh", "-c", "setsid sleep 271.5 </dev/null >/dev/null 2>&1 &")
    found = re.findall(r"^\s+(\d+) sleep 271.5", res.stderr, flags=re.MULTILINE)
    try:
        assert res.returncode == 1, res
        assert "1 process(es) started by" in res.stderr and len(found) == 1, res.stderr
    finally:
        for pid in found:  # the sleep this test started, by its PID
            os.kill(int(pid), signal.SIGKILL)
