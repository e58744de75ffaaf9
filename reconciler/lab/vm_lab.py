"""Bring up a VM lab: one QEMU guest per lab host, a real Debian 12 kernel in each (docs/LAB.md).

Same contract as the namespace lab (``Lab.up``): the same lock, state file, known_hosts and
client key files, the same ``lab down`` and crash cleanup. What differs: hosts are QEMU
guests booting the cached base image (``vm_image``) through per-host qcow2 overlays, their
identity comes from a per-host config disk, and their network lives in the lab's own network
namespace (``vm_net``), reached by opening sockets inside it (``LabInfo.ssh_netns``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reconciler.lab import host, procs, vm_accel, vm_guest, vm_image, vm_net
from reconciler.lab.model import LabError, LabHostSpec, LabInfo
from reconciler.lab.state import HostRecord, LabState, atomic_write, lab_dir
from reconciler.log import get_logger

log = get_logger(__name__)

REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "mke2fs", "ip", "ssh")
DEFAULT_READY_TIMEOUT = 600.0  # emulated (TCG) boots of several guests on 2 CPUs


def missing_tools() -> list[str]:
    import shutil

    return [t for t in (*REQUIRED_TOOLS, *vm_image.BUILD_TOOLS) if shutil.which(t) is None]


def prepare_image(progress: Callable[[str], None] | None = None) -> vm_image.BaseImage:
    """The base image, built now if it is not cached (before the lab lock is taken)."""
    return vm_image.ensure_image(progress=progress)


def build(
    prefix: str,
    specs: Sequence[LabHostSpec],
    ready_timeout: float,
    *,
    memory_mb: int = vm_guest.MEMORY_MB,
    progress: Callable[[str], None] | None = None,
) -> tuple[LabState, list[subprocess.Popen[bytes]], dict[str, float]]:
    """Build the guests (the lock is held by the caller); return the state, the QEMU
    processes and timings (image, network, boot)."""
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    base = vm_image.ensure_image(progress=say)
    t_image = time.monotonic()
    accel = vm_accel.choose(base.kernel)
    say(f"accelerator: {accel.name} ({accel.reason})")
    d = lab_dir(prefix)
    d.mkdir(mode=0o700, parents=True, exist_ok=False)
    (d / "hosts").mkdir(mode=0o700)
    ns = vm_net.netns_name(prefix)
    me = os.getpid()
    state = LabState(
        prefix=prefix,
        bridge=vm_net.BRIDGE,
        owner_pid=me,
        owner_start=procs.start_time(me),
        hosts=[
            HostRecord(name=s.name, address=s.address, netns=ns, veth=vm_net.tap_name(i))
            for i, s in enumerate(specs)
        ],
        kind="vm",
        vm={"netns": ns, "image": base.key, "accel": accel.name, "memory_mb": memory_mb},
    )
    state.save()  # recorded before anything exists, so a crash from here on is cleanable

    client = host.new_ed25519(f"reconciler-lab-{prefix}")
    atomic_write(d / "client_key", client.private_openssh, 0o600)
    atomic_write(d / "client_key.pub", client.public_line + "\n", 0o644)
    guests: list[vm_guest.GuestSpec] = []
    host_keys: dict[str, str] = {}
    for i, s in enumerate(specs):
        g = vm_guest.GuestSpec(s.name, s.address, i, d / "hosts" / s.name)
        g.directory.mkdir(mode=0o700)
        key = host.new_ed25519(f"root@{s.name}")
        vm_guest.write_config_disk(g, key.private_openssh, key.public_line, client.public_line)
        vm_guest.make_overlay(g, base)
        host_keys[s.name] = key.public_line
        guests.append(g)

    vm_net.create(prefix, len(specs))
    t_net = time.monotonic()

    popens: list[subprocess.Popen[bytes]] = []
    for g, rec in zip(guests, state.hosts, strict=True):
        p = vm_guest.spawn(g, ns, vm_guest.qemu_argv(g, base, accel, memory_mb))
        rec.pid = p.pid
        rec.pid_start = procs.start_time(p.pid)
        popens.append(p)
    state.save()
    say(
        f"booting {len(guests)} guest(s) ({accel.name}); waiting for their sshd (up to {ready_timeout:.0f} s)"
    )

    boot: dict[str, float] = {}

    def ready(i: int) -> None:
        rec = state.hosts[i]
        boot[rec.name] = vm_guest.wait_ready(guests[i], ns, rec.pid, rec.pid_start, ready_timeout)

    with ThreadPoolExecutor(max_workers=min(16, len(specs))) as pool:
        for fut in [pool.submit(ready, i) for i in range(len(specs))]:
            fut.result()

    known = "".join(f"{s.address} {host_keys[s.name]}\n" for s in specs)
    atomic_write(d / "known_hosts", known, 0o644)
    state.status = "up"
    state.save()
    t_end = time.monotonic()
    log.info(
        "lab.vm.up",
        prefix=prefix,
        hosts=len(specs),
        accel=accel.name,
        image_s=round(t_image - t0, 1),
        boot_s=round(t_end - t_net, 1),
    )
    timings = {
        "image": t_image - t0,
        "network": t_net - t_image,
        "boot": t_end - t_net,
        "build": t_end - t0,
        **{f"boot:{k}": v for k, v in boot.items()},
    }
    return state, popens, timings


def ssh_argv(info: LabInfo, host_name: str, argv: Sequence[str], connect_timeout: float = 10) -> list[str]:
    """OpenSSH from inside the lab's namespace to a guest, strict host keys, our client key;
    the remote command is ``argv`` quoted for the guest's shell."""
    h = info.host(host_name)
    return [
        "ip", "netns", "exec", info.ssh_netns,
        "ssh", "-F", "/dev/null", "-i", str(info.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={info.known_hosts}", "-o", f"ConnectTimeout={connect_timeout:g}",
        f"root@{h.address}", "--", shlex.join(argv),
    ]  # fmt: skip


def exec_in(
    info: LabInfo, host_name: str, argv: Sequence[str], input: bytes | None, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    if not argv:
        raise LabError("empty command")
    return subprocess.run(
        ssh_argv(info, host_name, argv),
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=host.CLEAN_ENV,
        check=False,
    )


def guest_memory(state_hosts: Sequence[tuple[str, int]]) -> dict[str, int]:
    """PSS of each guest's QEMU process in KiB (name -> KiB)."""
    return {name: vm_guest.pss_kib(pid) for name, pid in state_hosts}


def console_path(info: LabInfo, host_name: str) -> Path:
    return info.host(host_name).root / "console.log"
