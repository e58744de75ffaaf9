"""Skip policy for the suite (pytest plugin, enabled in tests/conftest.py).

A skipped test proves nothing, so CI must not be green with whole layers skipped. With
``RECONCILER_REQUIRE_LAB=1`` (set by ``.ci/run``) every skip is turned into a FAILURE (lab
unavailable, not root, a tool missing, a stale import guard, ``RECONCILER_VM_TESTS=0``...)
except a skip for a kernel feature that was probed and found missing (or present, when the test
shows what happens without it): those call :func:`skip_kernel_feature`, whose reason starts with
:data:`KERNEL_FEATURE`.

At the end of every run the skips are counted by reason, one ``N skipped: <reason>`` line each,
so a reader of the CI log sees at once what did not run and why.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator
from typing import NoReturn

import pytest

REQUIRE_ENV = "RECONCILER_REQUIRE_LAB"
KERNEL_FEATURE = "kernel feature: "


def required() -> bool:
    """True when a skip other than a kernel feature's must fail the run (CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "yes", "true")


def skip_kernel_feature(reason: str) -> NoReturn:
    """Skip because this kernel lacks (or has) a feature the test is about: the one kind of
    skip allowed in CI. ``reason`` names the feature and how it was probed."""
    pytest.skip(KERNEL_FEATURE + reason)


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def allowed_in_ci(reason: str) -> bool:
    return reason.startswith(KERNEL_FEATURE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not required():
        return
    reason = skip_reason(report)
    if allowed_in_ci(reason):
        return
    report.outcome = "failed"
    report.longrepr = f"{REQUIRE_ENV}=1: this test may not skip (only a missing kernel feature may): {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = Counter(skip_reason(r) for r in terminalreporter.stats.get("skipped", []))
    if not counts:
        return
    terminalreporter.section("skips by reason")
    for reason, n in counts.most_common():
        terminalreporter.write_line(f"{n} skipped: {reason}")
