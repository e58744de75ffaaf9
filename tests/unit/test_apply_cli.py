"""`reconciler apply` asks before changing hosts: without --yes and with no terminal on stdin
(a script, a cron job, a pipe) it refuses before loading the fleet or touching any host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_apply_without_yes_on_a_non_terminal_refuses_before_doing_anything(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    missing = tmp_path / "no-such-fleet"  # were the fleet loaded, this would be the error
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "apply", str(missing)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert "refusing to apply: stdin is not a terminal and --yes was not given" in res.stderr
    assert str(missing) not in res.stderr + res.stdout  # refused first: the fleet was never read
    # positive control: with --yes the same command goes on, and fails on the missing fleet
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "apply", "--yes", str(missing)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and "refusing to apply" not in res.stderr
    assert "no-such-fleet" in res.stderr + res.stdout
