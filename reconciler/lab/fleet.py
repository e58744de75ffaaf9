"""Lab host specs from a fleet: one lab host per fleet host, same name, public address and
(when declared) public IPv6 address."""

from __future__ import annotations

from pathlib import Path

from reconciler.fleet.model import Fleet
from reconciler.lab.model import LabHostSpec


def specs_from_fleet(fleet: Fleet) -> list[LabHostSpec]:
    return [
        LabHostSpec(
            name=h.name,
            address=str(h.public_address),
            address_v6=str(h.public_address_v6) if h.public_address_v6 is not None else "",
        )
        for h in fleet.hosts
    ]


def specs_from_repo(repo: Path) -> list[LabHostSpec]:
    """Load the fleet repo with the real loader (validated) and take its hosts."""
    from reconciler.fleet.load import load_fleet  # YAML and JSON Schema: only when a lab is made

    return specs_from_fleet(load_fleet(repo))
