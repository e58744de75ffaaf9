"""Machine-wide kernel limits a big lab can reach, raised for the lab and put back at down.

The neighbour table has its own pair (``network.raise_neigh_table``); here are the others a lab
of hundreds or thousands of hosts meets. Only ever raises; records ``{key: [old, new]}`` in the
lab's state so that ``lab down`` restores the old value unless someone changed it since.

- ``kernel/pid_max`` (32768 here): each host is two processes idle, but an apply runs a shell
  and its children on every host at once, and other users of the machine need PIDs too.
- ``net/ipv6/neigh/default/gc_thresh3``: lab hosts have IPv6 addresses; the IPv6 neighbour
  table is as machine-wide as the IPv4 one (1024 entries by default).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from reconciler.log import get_logger

log = get_logger(__name__)

SYSCTL_ROOT = Path("/proc/sys")
BIG_LAB = 100  # below this many hosts the defaults hold
PIDS_PER_HOST = 32


def wanted(hosts: int) -> dict[str, int]:
    """The value each limit needs for a lab of ``hosts`` (pure)."""
    if hosts <= BIG_LAB:
        return {}
    return {
        "kernel/pid_max": 32768 + PIDS_PER_HOST * hosts,
        "net/ipv6/neigh/default/gc_thresh3": 4 * hosts + 1024,
    }


def raise_values(values: dict[str, int], root: Path, event: str) -> dict[str, list[int]]:
    """Raise each kernel limit under ``root`` to its value in ``values`` (never lower one);
    ``{key: [old, new]}`` for the keys changed. A key that cannot be read or written is left
    alone (logged): the lab still comes up, and says which limit it could not raise."""
    changed: dict[str, list[int]] = {}
    for key, new in values.items():
        path = root / key
        try:
            old = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if old >= new:
            continue
        try:
            path.write_text(f"{new}\n")
        except OSError as err:
            log.warning(f"{event}.raise_failed", key=key, error=str(err))
            continue
        changed[key] = [old, new]
    if changed:
        log.info(f"{event}.raised", **{k: v[1] for k, v in changed.items()})
    return changed


def restore_values(recorded: dict[str, list[int]], keys: Iterable[str], root: Path) -> None:
    """Put back the old value of each of ``keys`` that ``raise_values`` changed, unless someone
    changed it since."""
    wanted_keys = set(keys)
    for key, (old, new) in recorded.items():
        if key not in wanted_keys:
            continue
        path = root / key
        try:
            if int(path.read_text().split()[0]) == new:
                path.write_text(f"{old}\n")
        except (OSError, ValueError, IndexError):
            pass


def raise_for(hosts: int, root: Path = SYSCTL_ROOT) -> dict[str, list[int]]:
    return raise_values(wanted(hosts), root, "lab.limits")


def restore(recorded: dict[str, list[int]], root: Path = SYSCTL_ROOT) -> None:
    """Put back what ``raise_for`` changed (keys with a '/'; the neighbour keys are
    ``network.restore_neigh_table``'s), unless someone changed it since."""
    restore_values(recorded, wanted(BIG_LAB + 1), root)
