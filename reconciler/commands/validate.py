"""`reconciler validate [REPO] [--json]`: check a fleet repo without touching any host.

Exit 0 with a one-line summary when the fleet is valid (warnings on stderr), 1 with every
problem on stderr when it is not, 2 on a usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler.commands import Subcommands
from reconciler.commands.bounds import RenderRefused, add_render_args, limits_from_args, load_and_render
from reconciler.domains.bounded_render import RenderResults
from reconciler.engine.identity import fleet_id
from reconciler.errors import FleetInvalid, Problem, RenderError
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet, Topology

# validate renders every host while the mesh has at most this many links (~63 hosts in a full
# mesh renders a connection per peer: n*(n-1) connections in all); above it, one host per set
# of roles and IPsec stack (what decides which sites, files, templates and stack it renders)
RENDER_ALL_LINKS = 2_000
_LOCATED = re.compile(r"\A(?P<file>[^\s:]+):(?P<line>[0-9]+): (?P<message>.*)\Z", re.DOTALL)


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "validate",
        help="check a fleet repo (YAML safety, JSON Schema, cross-references, crypto policy)",
        description="Check a fleet repo without contacting any host. Exit 0 when valid, 1 when not.",
    )
    p.add_argument("repo", nargs="?", default=".", help="the fleet repo directory (default: .)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument(
        "--no-render",
        action="store_true",
        help="skip rendering the hosts (templates, sites, per-host checks)",
    )
    add_render_args(p)
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


def hosts_to_render(fleet: Fleet) -> list[str]:
    """Every host, or (a mesh of more than RENDER_ALL_LINKS links) one per roles and stack."""
    if _links(fleet) <= RENDER_ALL_LINKS:
        return list(fleet.host_names())
    seen: dict[tuple[object, ...], str] = {}
    for h in fleet.hosts:
        seen.setdefault((h.roles, fleet.stack_of(h)), h.name)
    return sorted(seen.values())


def render_problems(fleet: Fleet, results: RenderResults) -> list[Problem]:
    """Render errors as problems: ``file:line`` when the error names them (templates)."""
    out: list[Problem] = []
    for name in sorted(results):
        result = results[name]
        if not isinstance(result, RenderError):
            continue
        text = str(result)
        m = _LOCATED.match(text)
        if m is not None:
            out.append(Problem(m["file"], int(m["line"]), 1, "", m["message"]))
        else:
            out.append(Problem(fleet.host(name).source_file or "fleet.yaml", 1, 1, "", f"render: {text}"))
    return out


def _invalid(args: argparse.Namespace, repo: Path, problems: Sequence[Problem]) -> int:
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        out = {
            "valid": False,
            "errors": [_problem_json(p) for p in errors],
            "warnings": [_problem_json(p) for p in problems if p.severity != "error"],
        }
        print(json.dumps(out, indent=2))
    for p in problems:
        print(p, file=sys.stderr)
    print(f"fleet repo {repo} is invalid: {_plural(len(errors), 'error')}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    rendered: list[str] = []
    try:
        if getattr(args, "no_render", False):
            fleet = load_fleet(repo)
        else:
            fleet, results = load_and_render(
                lambda: load_fleet(repo), hosts_to_render, limits_from_args(args)
            )
            rendered = sorted(results)
            problems = render_problems(fleet, results)
            if problems:
                for w in fleet.warnings:
                    print(w, file=sys.stderr)
                return _invalid(args, repo, problems)
    except RenderRefused as exc:
        return _invalid(args, repo, [Problem("fleet.yaml", 1, 1, "", str(exc))])
    except FleetInvalid as exc:
        return _invalid(args, repo, exc.problems)
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
                    "rendered_hosts": len(rendered),
                    "warnings": list(fleet.warnings),
                },
                indent=2,
            )
        )
    else:
        print(summary(fleet) + _rendered_note(fleet, rendered, getattr(args, "no_render", False)))
    return 0


def _rendered_note(fleet: Fleet, rendered: list[str], skipped: bool) -> str:
    if skipped:
        return "; hosts not rendered (--no-render)"
    if len(rendered) == len(fleet.hosts):
        return "; every host rendered"
    return (
        f"; {len(rendered)} of {len(fleet.hosts)} hosts rendered (one per set of roles and IPsec stack: "
        f"the mesh has more than {RENDER_ALL_LINKS} links)"
    )
