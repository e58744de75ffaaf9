"""Golden files: what the network domains render for fleets mirroring fleet-repo-example.

Layout: tests/golden/network/<variant>/<host>/<absolute path of each file> plus
``_resources.json`` (key pairs, handlers, services, tunnels, addresses, pending, owned dirs).
Regenerate after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_render_network_golden.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from network_fleets import VARIANTS, example_fleet

from reconciler.domains import firewall, ipsec, tunnels
from reconciler.domains.render import merge
from reconciler.fleet.model import Fleet
from reconciler.kinds.resources import Desired

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "network"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

CASES: dict[str, Fleet] = {**VARIANTS, "strongswan-ipip-kernel-keys-pending": example_fleet(keys=("db1",))}


def network_desired(fleet: Fleet, host: str) -> Desired:
    h = fleet.host(host)
    frags = [
        (n, m.render(fleet, h)) for n, m in (("firewall", firewall), ("ipsec", ipsec), ("tunnels", tunnels))
    ]
    return merge(host, frags)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.name.lower() if isinstance(value.value, int) else value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def resources_json(d: Desired) -> str:
    data = {
        "keypairs": [asdict(k) for k in d.keypairs],
        "handlers": [asdict(h) for h in d.handlers],
        "services": [asdict(s) for s in d.services],
        "tunnels": [asdict(t) for t in d.tunnels],
        "addresses": [asdict(a) for a in d.addresses],
        "pending": [asdict(p) for p in d.pending],
        "owned_dirs": list(d.owned_dirs),
        "files": [
            {k: v for k, v in asdict(f).items() if k != "content"} | {"mode": oct(f.mode)} for f in d.files
        ],
        "firewall": None
        if d.firewall is None
        else {
            "persistent_path": d.firewall.persistent_path,
            "persistent_path_v6": d.firewall.persistent_path_v6,
        },
    }
    return json.dumps(_plain(data), indent=2, sort_keys=True) + "\n"


def expected_tree(fleet: Fleet, host: str) -> dict[str, bytes]:
    d = network_desired(fleet, host)
    tree = {f.path.lstrip("/"): f.content for f in d.files}
    tree["_resources.json"] = resources_json(d).encode()
    return tree


def actual_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_network_golden(case: str) -> None:
    fleet = CASES[case]
    for host in fleet.host_names():
        root = GOLDEN / case / host
        want = expected_tree(fleet, host)
        if UPDATE:
            shutil.rmtree(root, ignore_errors=True)
            for rel, content in want.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(content)
        have = actual_tree(root)
        assert sorted(have) == sorted(want), f"{case}/{host}: file set differs (UPDATE_GOLDEN=1 to accept)"
        for rel in want:
            assert have[rel].decode() == want[rel].decode(), f"{case}/{host}/{rel} differs (UPDATE_GOLDEN=1)"


def test_rendering_is_deterministic() -> None:
    for fleet in CASES.values():
        for host in fleet.host_names():
            assert expected_tree(fleet, host) == expected_tree(fleet, host)
