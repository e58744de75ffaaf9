"""`reconciler validate [REPO] [--json]`: check a fleet repo without touching any host.

Exit 0 with a one-line summary when the fleet is valid (warnings on stderr), 1 with every
problem on stderr when it is not, 2 on a usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reconciler.engine.identity import fleet_id
from reconciler.errors import FleetInvalid, Problem
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet, Topology


def register(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="check a fleet repo (YAML safety, JSON Schema, cross-references, crypto policy)",
        description="Check a fleet repo without contacting any host. Exit 0 when valid, 1 when not.",
    )
    p.add_argument("repo", nargs="?", default=".", help="the fleet repo directory (default: .)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=run)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _links(fleet: Fleet) -> int:
    if fleet.mesh.topology is Topology.FULL:  # n*(n-1)/2 without building the pairs
        n = len(fleet.hosts)
        return n * (n - 1) // 2
    return len(fleet.mesh.links)


def counts(fleet: Fleet) -> dict[str, int]:
    return {
        "hosts": len(fleet.hosts),
        "links": _links(fleet),
        "roles": len(fleet.roles),
        "sites": len(fleet.sites),
        "apparmor_profiles": len(fleet.apparmor),
        "managed_files": len(fleet.files),
        "public_keys": len(fleet.public_keys),
        "warnings": len(fleet.warnings),
    }


def summary(fleet: Fleet) -> str:
    c = counts(fleet)
    return (
        f"fleet {fleet.name}: {_plural(c['hosts'], 'host')}, {_plural(c['links'], 'link')}, "
        f"{_plural(c['roles'], 'role')}, {_plural(c['sites'], 'site')}, "
        f"{_plural(c['apparmor_profiles'], 'AppArmor profile')}, "
        f"{_plural(c['managed_files'], 'managed file')}"
    )


def fleet_id_note(fleet: Fleet) -> str:
    """A note (not a warning: plans stay quiet) when fleet.yaml does not pin ``id:``."""
    if fleet.id:
        return ""
    return (
        f"fleet.yaml: note: id: not pinned: hosts record the fleet id {fleet_id(fleet)}, derived from "
        f"the name '{fleet.name}', so another fleet with that name would pass for this one; pin a "
        "unique id (e.g. `id: ` and the output of `uuidgen`) before the first apply (changing it "
        "later needs `reconciler apply --adopt` on every host)"
    )


def _problem_json(p: Problem) -> dict[str, Any]:
    return {
        "file": p.file,
        "line": p.line,
        "col": p.col,
        "field": p.field,
        "message": p.message,
        "severity": p.severity,
        "text": str(p),
    }


def run(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    try:
        fleet = load_fleet(repo)
    except FleetInvalid as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        if args.json:
            out = {
                "valid": False,
                "errors": [_problem_json(p) for p in errors],
                "warnings": [_problem_json(p) for p in exc.problems if p.severity != "error"],
            }
            print(json.dumps(out, indent=2))
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"fleet repo {repo} is invalid: {_plural(len(errors), 'error')}", file=sys.stderr)
        return 1
    for w in fleet.warnings:
        print(w, file=sys.stderr)
    note = fleet_id_note(fleet)
    if note:
        print(note, file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "fleet": fleet.name,
                    "fleet_id": fleet_id(fleet),
                    "fleet_id_pinned": bool(fleet.id),
                    "counts": counts(fleet),
                    "warnings": list(fleet.warnings),
                },
                indent=2,
            )
        )
    else:
        print(summary(fleet))
    return 0
