"""pytest plugin: ``lab_factory`` (session) and the ``lab`` and ``vm`` markers.

Enabled by ``pytest_plugins = ["tests.lab_plugin", ...]`` in tests/conftest.py.
Tests marked ``@pytest.mark.lab`` skip, with the reason printed, when not root or when the
tools the lab needs are missing. Tests marked ``@pytest.mark.vm`` (QEMU guests,
``lab_factory(specs, vm=True)``) also skip when QEMU or the image tools are missing, or when
``RECONCILER_VM_TESTS=0``. Every lab made through ``lab_factory`` is downed at session
end, on failure too; SIGTERM/SIGHUP also take them down (and SIGKILL leftovers are removed by
the next ``Lab.up`` or ``reconciler lab down``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

import pytest

from reconciler.lab.capabilities import probe_capabilities
from reconciler.lab.lab import Lab, _down_live_labs
from reconciler.lab.model import LabHostSpec

LabFactory = Callable[..., Lab]


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run here, or None."""
    if sys.platform != "linux":
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network and mount namespaces)"
    caps = probe_capabilities()
    for name in ("lab", "overlayfs"):
        if not caps.has(name):
            return caps.reason(name)
    return None


def vm_skip_reason() -> str | None:
    """Why VM lab tests cannot run here, or None."""
    if os.environ.get("RECONCILER_VM_TESTS", "1").strip().lower() in ("0", "no", "false", "skip"):
        return "RECONCILER_VM_TESTS=0"
    reason = lab_skip_reason()
    if reason:
        return reason
    from reconciler.lab.vm_lab import missing_tools

    missing = missing_tools()
    if missing:
        return f"the VM lab needs {', '.join(missing)} (scripts/install.sh installs them)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs root and the lab (network namespaces, sshd)")
    config.addinivalue_line(
        "markers", "vm: needs the VM lab (QEMU guests with a Debian 12 kernel); RECONCILER_VM_TESTS=0 skips"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("vm") is not None:
        reason = vm_skip_reason()
        if reason:
            pytest.skip(f"VM lab unavailable: {reason}")
    if item.get_closest_marker("lab") is not None:
        reason = lab_skip_reason()
        if reason:
            pytest.skip(f"lab unavailable: {reason}")


_previous: dict[int, Any] = {}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _down_live_labs()
    prev = _previous.get(signum, signal.SIG_DFL)
    signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    else:
        os.kill(os.getpid(), signum)


def pytest_sessionstart(session: pytest.Session) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            _previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread
            pass


@contextlib.contextmanager
def _timeout_paused() -> Iterator[None]:
    """Waiting in line for the machine-wide lab lock is not the test's time: pause
    pytest-timeout's SIGALRM timer (its default method) during ``Lab.up`` (which has its own
    lock and readiness timeouts), then re-arm it with what was left."""
    try:
        left, _ = signal.getitimer(signal.ITIMER_REAL)
    except (AttributeError, OSError):
        left = 0.0
    paused = left > 0 and threading.current_thread() is threading.main_thread()
    if paused:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if paused:
            signal.setitimer(signal.ITIMER_REAL, left)


@pytest.fixture(scope="session")
def lab_factory() -> Iterator[LabFactory]:
    """``lab_factory(specs, prefix=None, **Lab.up kwargs) -> Lab`` (``vm=True``: QEMU guests).

    A new call first downs the labs made earlier in the session (one lab at a time on the
    machine); every lab is downed at session end, on failure too."""
    made: list[Lab] = []

    def make(specs: Sequence[LabHostSpec], prefix: str | None = None, **kwargs: Any) -> Lab:
        reason = vm_skip_reason() if kwargs.get("vm") else lab_skip_reason()
        if reason:
            pytest.skip(f"{'VM ' if kwargs.get('vm') else ''}lab unavailable: {reason}")
        # Only one lab can exist at a time: a lab an earlier module left up (it is downed at
        # session end otherwise) would make this process wait for itself.
        for old in made:
            old.down()
        kwargs.setdefault("lock_timeout", float(os.environ.get("RECONCILER_LAB_WAIT", "600")))
        with _timeout_paused():
            lab = Lab.up(specs, prefix=prefix, **kwargs)
        made.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in made:
            lab.down()
