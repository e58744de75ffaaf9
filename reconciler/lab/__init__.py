"""The lab: real local test hosts in network namespaces (see docs/LAB.md).

Each host has its own network, mount, UTS, IPC and PID namespace, an overlay of the machine's
root as its own writable root, and its own OpenSSH sshd (key auth only) on the lab bridge.
"""

from __future__ import annotations

from reconciler.lab.capabilities import Capabilities, Capability, probe_capabilities
from reconciler.lab.fleet import specs_from_fleet, specs_from_repo
from reconciler.lab.lab import Lab
from reconciler.lab.model import LabError, LabFleet, LabHost, LabHostSpec, LabInfo
from reconciler.lab.network import VOID_ADDRESS

__all__ = [
    "Capabilities",
    "Capability",
    "Lab",
    "LabError",
    "LabFleet",
    "LabHost",
    "LabHostSpec",
    "LabInfo",
    "VOID_ADDRESS",
    "probe_capabilities",
    "specs_from_fleet",
    "specs_from_repo",
]
