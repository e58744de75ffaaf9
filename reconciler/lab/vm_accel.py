"""Which QEMU accelerator the VM lab uses: KVM where it really works, else TCG (emulation).

``/dev/kvm`` opening is not enough: on some machines (this project's, nested under another
hypervisor) a KVM guest hangs in early boot. So KVM is proven by a bounded boot test: the
base image's kernel is booted with ``-accel kvm`` and no root disk; a working KVM reaches the
kernel's "unable to mount root" panic within seconds and QEMU exits (``panic=-1 -no-reboot``).
A hang past the timeout (the QEMU process is killed) means TCG. The verdict is cached per
kernel and QEMU binary in the lab's run directory (cleared at reboot).
``RECONCILER_VM_ACCEL=tcg|kvm`` skips the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.lab.state import LAB_ROOT, atomic_write, ensure_root
from reconciler.log import get_logger

log = get_logger(__name__)

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 25.0
_CACHE = "kvm-probe.json"


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" | "tcg"
    reason: str

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def _kvm_usable() -> str | None:
    """Why KVM cannot even be tried, or None."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"/dev/kvm: {err.strerror}"
    os.close(fd)
    return None


def _cache_key(kernel: Path) -> str:
    qemu = shutil.which(QEMU) or QEMU
    parts = [str(kernel), str(kernel.stat().st_size), qemu]
    try:
        parts.append(str(Path(qemu).stat().st_mtime_ns))
    except OSError:
        pass
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM without a root disk; True when it reaches its panic in time."""
    why = _kvm_usable()
    if why:
        return False, why
    argv = [
        QEMU, "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return (
            False,
            f"a KVM guest did not reach its first kernel panic within {timeout:.0f} s (KVM hangs here)",
        )
    text = out.decode(errors="replace")
    seconds = time.monotonic() - t0
    if "Kernel panic" in text or "VFS:" in text:
        return True, f"a KVM guest booted its kernel in {seconds:.1f} s"
    tail = " / ".join(text.strip().splitlines()[-3:])
    return False, f"the KVM test boot exited {proc.returncode} without reaching the kernel ({tail})"


def choose(kernel: Path) -> Accel:
    """The accelerator for guests booting ``kernel`` (cached verdict of the KVM boot test)."""
    forced = os.environ.get("RECONCILER_VM_ACCEL", "auto").strip().lower()
    if forced in ("tcg", "kvm"):
        return Accel(forced, "RECONCILER_VM_ACCEL")
    ensure_root()
    cache = LAB_ROOT / _CACHE
    key = _cache_key(kernel)
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return Accel("kvm" if data["kvm"] else "tcg", str(data["reason"]) + " (cached)")
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = probe_kvm(kernel)
    atomic_write(cache, json.dumps({"key": key, "kvm": ok, "reason": reason}) + "\n", 0o644)
    log.info("lab.vm.accel", kvm=ok, reason=reason)
    return Accel("kvm" if ok else "tcg", reason)
