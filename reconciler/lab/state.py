"""Where a lab lives on disk and the state file that records everything it created.

Layout (all under ``LAB_ROOT``, 0700)::

    .lock                 flock'ed while reading/writing owner.json
    owner.json            which lab owns 192.0.2.0/24 now (prefix, owner PID + start time)
    <prefix>/state.json   every netns, link, process and firewall rule of that lab
    <prefix>/hosts/<name>/  per-host overlay upper/work dirs, /root, host key, sshd log
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.lab.model import LabError

LAB_ROOT = Path(os.environ.get("RECONCILER_LAB_ROOT", "/run/reconciler-lab"))
PREFIX_RE = re.compile(r"^rcl[a-z0-9]{1,5}$")  # bridge "<prefix>br", veth "<prefix>h<n>" <= 15 chars
STATE_VERSION = 1


def new_prefix() -> str:
    return "rcl" + secrets.token_hex(2)


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise LabError(f"lab prefix {prefix!r}: must match {PREFIX_RE.pattern} (e.g. rcl1a2b)")
    return prefix


def lab_dir(prefix: str) -> Path:
    return LAB_ROOT / check_prefix(prefix)


def ensure_root() -> Path:
    LAB_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    return LAB_ROOT


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class HostRecord:
    name: str
    address: str
    netns: str
    veth: str
    pid: int = 0
    pid_start: int | None = None
    init_pid: int = 0


@dataclass
class LabState:
    prefix: str
    bridge: str
    owner_pid: int
    owner_start: int | None
    detached: bool = False
    status: str = "starting"  # starting | up | stopping
    hosts: list[HostRecord] = field(default_factory=list)
    iptables_rules: list[list[str]] = field(default_factory=list)  # argv after "-A"/"-D"
    neigh_limits: dict[str, list[int]] = field(default_factory=dict)  # sysctl key -> [old, new]
    kind: str = "netns"  # netns | vm
    vm: dict[str, Any] = field(default_factory=dict)  # VM labs: netns, image key, accelerator

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "prefix": self.prefix,
            "bridge": self.bridge,
            "owner_pid": self.owner_pid,
            "owner_start": self.owner_start,
            "detached": self.detached,
            "status": self.status,
            "hosts": [vars(h) for h in self.hosts],
            "iptables_rules": self.iptables_rules,
            "neigh_limits": self.neigh_limits,
            "kind": self.kind,
            "vm": self.vm,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        return cls(
            prefix=check_prefix(str(data["prefix"])),
            bridge=str(data["bridge"]),
            owner_pid=int(data["owner_pid"]),
            owner_start=data.get("owner_start"),
            detached=bool(data.get("detached", False)),
            status=str(data.get("status", "starting")),
            hosts=[HostRecord(**h) for h in data.get("hosts", [])],
            iptables_rules=[list(map(str, r)) for r in data.get("iptables_rules", [])],
            neigh_limits={str(k): [int(x) for x in v] for k, v in data.get("neigh_limits", {}).items()},
            kind=str(data.get("kind", "netns")),
            vm=dict(data.get("vm", {})),
        )

    def save(self) -> None:
        atomic_write(lab_dir(self.prefix) / "state.json", self.to_json())


def load_state(prefix: str) -> LabState | None:
    path = lab_dir(prefix) / "state.json"
    try:
        return LabState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"{path}: unreadable lab state ({exc})") from exc


def known_prefixes() -> list[str]:
    """Prefixes that have a state directory (running labs and crash leftovers)."""
    if not LAB_ROOT.is_dir():
        return []
    return sorted(p.name for p in LAB_ROOT.iterdir() if p.is_dir() and PREFIX_RE.match(p.name))
