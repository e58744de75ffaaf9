"""The mesh picture: hosts grouped by site, one edge per linked pair, coloured by its state.

Pure: ``layout(status)`` turns the ``mesh`` part of /status into positioned nodes and edges; the
template draws them as inline SVG (no script, no external asset). A pair's state comes from the
two hosts' last verify after apply: ``up`` (checks for the pair passed on a side and failed on
none), ``down`` (a check for the pair failed), ``pending-keys`` (a side's public key is not in the
fleet repo yet), ``not-verified`` (no verify result names the pair).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

UP, DOWN, PENDING_KEYS, NOT_VERIFIED = "up", "down", "pending-keys", "not-verified"
LINK_STATES = (UP, DOWN, PENDING_KEYS, NOT_VERIFIED)
NO_SITE = "fleet"

GROUP_RADIUS = 95.0
NODE_SPACING = 340.0


def pair_state(a: str, b: str, keys: set[str], checks: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    if a not in keys or b not in keys:
        return PENDING_KEYS
    seen_pass = False
    for host, peer in ((a, b), (b, a)):
        for c in checks.get(host, ()):
            if c.get("peer") != peer:
                continue
            if c.get("status") == "fail":
                return DOWN
            seen_pass |= c.get("status") == "pass"
    return UP if seen_pass else NOT_VERIFIED


@dataclass(frozen=True)
class Node:
    name: str
    site: str
    x: float
    y: float
    state: str


@dataclass(frozen=True)
class Edge:
    a: str
    b: str
    state: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Group:
    site: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Picture:
    width: float
    height: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    groups: tuple[Group, ...]
    counts: Mapping[str, int]


def layout(mesh: Mapping[str, Any], states: Mapping[str, str]) -> Picture:
    """Sites on a row (wrapping every 3), each site's hosts on a circle inside it."""
    sites: dict[str, list[str]] = {}
    for host in mesh.get("hosts", []):
        sites.setdefault(str(host.get("site") or NO_SITE), []).append(str(host["name"]))
    per_row = 3
    pos: dict[str, tuple[float, float]] = {}
    nodes: list[Node] = []
    groups: list[Group] = []
    for i, (site, names) in enumerate(sorted(sites.items())):
        cx = NODE_SPACING / 2 + (i % per_row) * NODE_SPACING
        cy = NODE_SPACING / 2 + (i // per_row) * NODE_SPACING
        r = GROUP_RADIUS + 12 * max(0, len(names) - 4)
        groups.append(Group(site, cx, cy, r + 40))
        for j, name in enumerate(sorted(names)):
            angle = 2 * math.pi * j / max(1, len(names)) - math.pi / 2
            x, y = (cx, cy) if len(names) == 1 else (cx + r * math.cos(angle), cy + r * math.sin(angle))
            pos[name] = (round(x, 1), round(y, 1))
            nodes.append(Node(name, site, *pos[name], states.get(name, "Unknown")))
    edges: list[Edge] = []
    counts = dict.fromkeys(LINK_STATES, 0)
    for link in mesh.get("links", []):
        a, b, state = str(link["a"]), str(link["b"]), str(link["state"])
        if a in pos and b in pos:
            edges.append(Edge(a, b, state, *pos[a], *pos[b]))
            counts[state] = counts.get(state, 0) + 1
    rows = max(1, math.ceil(len(sites) / per_row))
    width = NODE_SPACING * min(per_row, max(1, len(sites)))
    return Picture(width, NODE_SPACING * rows, tuple(nodes), tuple(edges), tuple(groups), counts)
