"""The skip policy (tests/skip_policy.py): under RECONCILER_REQUIRE_LAB=1 a skip fails the run
unless it is a missing kernel feature; every run prints the skips counted by reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SAMPLE = """
import pytest
from tests.skip_policy import skip_kernel_feature

def test_not_root():
    pytest.skip("the lab needs root")

def test_no_esp():
    skip_kernel_feature("kernel_esp: no ESP in this kernel")

def test_no_esp_again():
    skip_kernel_feature("kernel_esp: no ESP in this kernel")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    assert True
"""


def run_sample(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_REQUIRE_LAB"}
    env["PYTHONPATH"] = str(REPO)
    if require is not None:
        env["RECONCILER_REQUIRE_LAB"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.skip_policy",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip


def test_without_the_requirement_skips_pass_and_are_counted_by_reason(tmp_path: Path) -> None:
    res = run_sample(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped: kernel feature: kernel_esp: no ESP in this kernel" in res.stdout
    assert "1 skipped: the lab needs root" in res.stdout


def test_under_the_requirement_only_a_kernel_feature_may_skip(tmp_path: Path) -> None:
    res = run_sample(tmp_path, "1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 failed" in res.stdout and "2 skipped" in res.stdout and "1 xfailed" in res.stdout, res.stdout
    assert "FAILED" in res.stdout and "test_not_root" in res.stdout
    assert "RECONCILER_REQUIRE_LAB=1: this test may not skip" in res.stdout
    assert "2 skipped: kernel feature: kernel_esp" in res.stdout
    assert "skipped: the lab needs root" not in res.stdout  # it failed: not counted as a skip
