"""Lab host specs from a fleet: one lab host per fleet host, same name, public address and
(when declared) public IPv6 address."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from reconciler.lab.model import LabError, LabHostSpec


def specs_from_fleet(fleet: Any) -> list[LabHostSpec]:
    """``fleet`` is a ``reconciler.fleet.model.Fleet``."""
    return [
        LabHostSpec(
            name=h.name,
            address=str(h.public_address),
            address_v6=str(h.public_address_v6) if h.public_address_v6 is not None else "",
        )
        for h in fleet.hosts
    ]


def specs_from_repo(repo: Path) -> list[LabHostSpec]:
    """Load the fleet repo with the real loader when present, else read hosts/*.yaml minimally."""
    try:
        load = importlib.import_module("reconciler.fleet.load")
    except ModuleNotFoundError:
        return _fallback_specs_from_hosts_dir(repo)
    return specs_from_fleet(load.load_fleet(repo))


def _fallback_specs_from_hosts_dir(repo: Path) -> list[LabHostSpec]:
    """FALLBACK used only while reconciler.fleet.load does not exist: name + public_address
    from hosts/*.yaml (yaml.safe_load), without the loader's validation."""
    import yaml

    specs = []
    hosts_dir = repo / "hosts"
    if not hosts_dir.is_dir():
        raise LabError(f"{hosts_dir}: no hosts directory in the fleet repo")
    for path in sorted(hosts_dir.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "name" not in data or "public_address" not in data:
            raise LabError(f"{path}: a Host needs name and public_address")
        specs.append(LabHostSpec(name=str(data["name"]), address=str(data["public_address"])))
    return sorted(specs, key=lambda s: s.name)
