"""Every command handles a closed stdout quietly and honours NO_COLOR."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler import log

ROOT = Path(__file__).resolve().parents[2]


def _run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    # `... | head -1` once head has exited: the reader is gone before the first write
    cmd = [sys.executable, "-m", "reconciler", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        os.close(write_end)
    return subprocess.CompletedProcess(cmd, res.returncode, b"", res.stderr)


def test_closed_stdout_is_quiet() -> None:
    res = _run_into_closed_pipe(["validate", str(ROOT / "fleet-repo-example"), "--json"])
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    assert b"BrokenPipeError" not in res.stderr
    assert res.returncode in (0, 141)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("no_color", ["", "1"])
def test_log_colours_follow_no_color(monkeypatch: pytest.MonkeyPatch, no_color: str) -> None:
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    log.configure(level="INFO")
    try:
        log.get_logger("test").warning("hello", host="web1")
    finally:
        monkeypatch.undo()
        log.configure(level="WARNING")
    text = tty.getvalue()
    assert "hello" in text
    assert ("\x1b[" in text) is (not no_color)
