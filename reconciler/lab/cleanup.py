"""Remove a lab, recorded or left over by a crashed run: only things named with its prefix.

Processes are killed only when they are provably the lab's: a recorded PID with the same start
time, a command line holding the lab's own state path, or membership of one of the lab's
network namespaces (found by namespace inode).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from reconciler.lab import limits, network, procs
from reconciler.lab.model import LabError
from reconciler.lab.state import LAB_ROOT, known_prefixes, lab_dir, load_state
from reconciler.log import get_logger

log = get_logger(__name__)


def _netns_inodes(names: list[str]) -> set[int]:
    inodes = set()
    for n in names:
        try:
            inodes.add(os.stat(f"/run/netns/{n}").st_ino)
        except OSError:
            pass
    return inodes


def processes_in_netns(names: list[str]) -> list[int]:
    inodes = _netns_inodes(names)
    if not inodes:
        return []
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def mounts_of(prefix: str) -> list[str]:
    """Mount points in the root namespace that belong to this prefix (netns files, state dir)."""
    marks = (f"/run/netns/{prefix}-", f"{lab_dir(prefix)}/")
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) > 4 and parts[4].startswith(marks):
            found.append(parts[4])
    return found


def leftovers(prefix: str) -> list[str]:
    """Everything that still carries this prefix; empty when the lab is fully gone."""
    marker = f"{lab_dir(prefix)}/"
    found = [f"netns {n}" for n in network.netns_of(prefix)]
    found += [f"link {n}" for n in network.links_of(prefix)]
    found += [f"mount {m}" for m in mounts_of(prefix)]
    found += [f"process {p}" for p in procs.find_processes(marker) if procs.is_alive(p)]
    if lab_dir(prefix).exists():
        found.append(f"dir {lab_dir(prefix)}")
    return found


def down_prefix(prefix: str, *, release_lock: bool = True) -> list[str]:
    """Remove lab ``prefix`` (running or crashed); return what could not be removed."""
    d = lab_dir(prefix)
    marker = f"{d}/"
    try:
        state = load_state(prefix)
    except LabError as exc:
        log.warning("lab.down.bad_state", prefix=prefix, error=str(exc))
        state = None
    if state is not None and state.status != "stopping":
        state.status = "stopping"
        try:
            state.save()
        except OSError:
            pass
    recorded_ns = [h.netns for h in state.hosts] if state else []
    netns = sorted(set(recorded_ns) | set(network.netns_of(prefix)))

    victims: list[tuple[int, int | None]] = []
    if state is not None:
        for h in state.hosts:
            if procs.kill_verified(h.pid, h.pid_start):
                victims.append((h.pid, h.pid_start))
    for pid in procs.find_processes(marker):
        started = procs.start_time(pid)
        if procs.kill_verified(pid, started):
            victims.append((pid, started))
    for pid in processes_in_netns(netns):
        started = procs.start_time(pid)
        if procs.kill_verified(pid, started):
            victims.append((pid, started))
    still = procs.wait_dead(victims, timeout=10)
    if still:
        log.warning("lab.down.unkillable", prefix=prefix, pids=still)

    network.remove(prefix, netns)
    network.remove_forward(prefix, state.iptables_rules if state else [])
    if state is not None and state.neigh_limits:
        network.restore_neigh_table(state.neigh_limits)
        limits.restore(state.neigh_limits)
    for mnt in mounts_of(prefix):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
    if release_lock:
        from reconciler.lab import lock

        lock.release(prefix)

    deadline = time.monotonic() + 5
    left = leftovers(prefix)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        if any(x.startswith("link ") for x in left):
            network.remove(prefix)
        left = leftovers(prefix)
    if left:
        log.warning("lab.down.leftovers", prefix=prefix, left=left)
    else:
        log.info("lab.down.done", prefix=prefix)
    return left


def all_prefixes() -> list[str]:
    """Every reconciler lab prefix on this machine: state dirs and prefixed kernel objects."""
    return sorted(set(known_prefixes()) | network.all_prefixes_in_kernel())


def stale_probe_netns() -> list[str]:
    """Scratch netns of capability probes whose process died mid-probe."""
    from reconciler.lab.capabilities import PROBE_NETNS_PREFIX

    stale = []
    for ns in network.list_netns():
        tail = ns.removeprefix(PROBE_NETNS_PREFIX)
        if tail != ns and tail.isdigit() and not procs.is_alive(int(tail)):
            stale.append(ns)
    return stale


def down_all() -> dict[str, list[str]]:
    results = {p: down_prefix(p) for p in all_prefixes()}
    stale = stale_probe_netns()
    if stale:
        network.ip_batch([f"netns del {ns}" for ns in stale], force=True)
    return results


__all__ = ["LAB_ROOT", "all_prefixes", "down_all", "down_prefix", "leftovers"]
