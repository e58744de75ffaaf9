"""One VM lab guest: its overlay disk, its config disk (identity), its QEMU process, readiness.

Files in the guest's state directory (``<lab>/hosts/<name>/``)::

    disk.qcow2    copy-on-write overlay over the cached base image (the base is never written)
    config/       what the config disk holds: hostname, hosts, interfaces, host key, client key
    config.img    that directory as a small ext4 image (mke2fs -d: no loop mount, no rebuild
                  of the base image per host); read by reconciler-lab-identity.service at boot
    console.log   the guest's serial console (kernel, systemd), shown when a boot fails
    qemu.log      QEMU's own stderr
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.host import netns
from reconciler.lab import procs
from reconciler.lab.model import LAB_NETWORK, LabError
from reconciler.lab.state import atomic_write
from reconciler.lab.vm_accel import QEMU, Accel
from reconciler.lab.vm_image import BaseImage
from reconciler.lab.vm_net import mac_address, tap_name

MEMORY_MB = 512
KERNEL_ARGS = "console=ttyS0 root=/dev/vda rw net.ifnames=0 quiet systemd.show_status=0 random.trust_cpu=on"


@dataclass(frozen=True)
class GuestSpec:
    name: str
    address: str
    index: int
    directory: Path


def write_config_disk(
    spec: GuestSpec, host_key_private: bytes, host_key_public: str, client_public: str
) -> Path:
    """The guest's identity as a small read-only ext4 image."""
    cfg = spec.directory / "config"
    cfg.mkdir(parents=True, exist_ok=True, mode=0o700)
    interfaces = (
        "# written at boot by reconciler-lab-identity from the lab's config disk\n"
        "auto lo\niface lo inet loopback\n\n"
        f"auto eth0\niface eth0 inet static\n    address {spec.address}/{LAB_NETWORK.prefixlen}\n\n"
        "source /etc/network/interfaces.d/*\n"
    )
    files: dict[str, tuple[bytes | str, int]] = {
        "hostname": (spec.name + "\n", 0o644),
        "hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.name}\n", 0o644),
        "interfaces": (interfaces, 0o644),
        "ssh_host_ed25519_key": (host_key_private, 0o600),
        "ssh_host_ed25519_key.pub": (host_key_public + "\n", 0o644),
        "authorized_keys": (client_public + "\n", 0o600),
    }
    for name, (data, mode) in files.items():
        atomic_write(cfg / name, data, mode)
    image = spec.directory / "config.img"
    proc = subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rclcfg", "-d", str(cfg), str(image), "4M"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(
            f"lab guest {spec.name}: mke2fs of its config disk failed: {proc.stderr.decode().strip()}"
        )
    image.chmod(0o600)
    return image


def make_overlay(spec: GuestSpec, base: BaseImage) -> Path:
    disk = spec.directory / "disk.qcow2"
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.disk), str(disk)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"lab guest {spec.name}: qemu-img create failed: {proc.stderr.decode().strip()}")
    return disk


def _qemu_path(path: Path) -> str:
    text = str(path)
    if "," in text:  # QEMU option syntax: a comma separates options
        raise LabError(f"{text}: a path with a comma cannot be given to QEMU")
    return text


def qemu_argv(spec: GuestSpec, base: BaseImage, accel: Accel, memory_mb: int = MEMORY_MB) -> list[str]:
    d = spec.directory
    return [
        QEMU,
        "-name", f"rcl-{spec.name}",
        *accel.qemu_args(),
        "-m", str(memory_mb), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{_qemu_path(d / 'console.log')}",
        "-kernel", _qemu_path(base.kernel), "-initrd", _qemu_path(base.initrd),
        "-append", KERNEL_ARGS,
        "-drive", f"file={_qemu_path(d / 'disk.qcow2')},if=virtio,format=qcow2,cache=unsafe",
        "-drive", f"file={_qemu_path(d / 'config.img')},if=virtio,format=raw,readonly=on",
        "-netdev", f"tap,id=n0,ifname={tap_name(spec.index)},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac_address(spec.address)}",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


def spawn(spec: GuestSpec, ns: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start QEMU inside the lab's network namespace (``ip netns exec`` execs it: same PID)."""
    with open(spec.directory / "qemu.log", "ab") as qlog:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=qlog,
            start_new_session=True,
            close_fds=True,
        )


def console_tail(directory: Path, lines: int = 25) -> str:
    parts = []
    for name in ("console.log", "qemu.log"):
        try:
            text = (directory / name).read_text(errors="replace")
        except OSError:
            continue
        tail = "\n".join(text.replace("\r", "").splitlines()[-lines:])
        if tail.strip():
            parts.append(f"--- {name} (last lines)\n{tail}")
    return "\n".join(parts) or "(no console output)"


def ssh_banner(ns: str, address: str, timeout: float = 2.0) -> bool:
    """True when an SSH server answers on address:22, seen from inside namespace ``ns``."""
    try:
        with netns.connect_in_sync(ns, address, 22, timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"SSH-2.0-")
    except (TimeoutError, OSError):
        return False


def wait_ready(spec: GuestSpec, ns: str, pid: int, pid_start: int | None, timeout: float) -> float:
    """Wait until the guest's sshd answers; return the seconds it took. On a timeout or a dead
    QEMU, the error holds the tail of the guest's serial console."""
    t0 = time.monotonic()
    while True:
        if ssh_banner(ns, spec.address):
            return time.monotonic() - t0
        if not procs.is_alive(pid, pid_start):
            raise LabError(
                f"lab guest {spec.name}: QEMU exited before sshd answered:\n{console_tail(spec.directory)}"
            )
        if time.monotonic() - t0 > timeout:
            raise LabError(
                f"lab guest {spec.name}: sshd not answering on {spec.address}:22 after {timeout:.0f} s "
                f"(boot too slow or failed):\n{console_tail(spec.directory)}"
            )
        time.sleep(1.0)


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (its QEMU) in KiB, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
