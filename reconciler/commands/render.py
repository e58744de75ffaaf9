"""`reconciler render [REPO] (--host NAME ... | --all) --out DIR [--json] [--keys DIR]`.

Loads the fleet, renders the chosen hosts (every domain, through reconciler.domains.render) and writes
every rendered file under DIR at its absolute path, mode kept; symlinks as symlinks. Private
keys are never rendered, so never written. Layout: one ``--host`` writes ``DIR/etc/...``; several
hosts (or ``--all``) write ``DIR/<host>/etc/...``. Everything is rendered before anything is
written: bad input prints the loader's (or renderer's) errors, exits 1 and writes nothing.

``--keys DIR`` renders as if ``DIR/<host>.pub`` had been collected into the fleet repo's
``keys/`` (a preview, e.g. with tests/fixtures/keys/strongswan); keys in the repo still win
unless the same host has one in DIR.

Rendering runs in a worker process under limits (``--render-timeout``, ``--render-memory``,
``--max-file-bytes``, ``--max-host-bytes``; ``reconciler.commands.bounds``): a template that
loops, allocates or writes too much is refused with its file and line, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.commands import Subcommands
from reconciler.commands.bounds import add_render_args, limits_from_args, load_and_render
from reconciler.errors import FleetInvalid, ReconcilerError, RenderError
from reconciler.fleet.model import Fleet, frozen_map
from reconciler.kinds.resources import Desired

MAX_KEY_BYTES = 64 * 1024


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "render",
        help="render hosts' desired files into a directory (no SSH)",
        description="Render the desired configuration of hosts into DIR, purely (no host is contacted).",
    )
    p.add_argument("repo", nargs="?", default=".", help="fleet repository (default: .)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--host", action="append", metavar="NAME", help="host to render (repeatable)")
    which.add_argument("--all", action="store_true", help="render every host")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="preview with public keys from DIR/<host>.pub as if collected into keys/",
    )
    add_render_args(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Written:
    host: str
    root: Path
    files: tuple[str, ...]
    links: tuple[str, ...]


def with_keys_from(fleet: Fleet, keys_dir: Path) -> Fleet:
    """The fleet with public keys read from ``keys_dir/<host>.pub`` (hosts of the fleet only)."""
    if not keys_dir.is_dir():
        raise ReconcilerError(f"--keys {keys_dir}: not a directory")
    keys = dict(fleet.public_keys)
    for name in fleet.host_names():
        path = keys_dir / f"{name}.pub"
        if not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) > MAX_KEY_BYTES:
            raise ReconcilerError(f"{path}: larger than {MAX_KEY_BYTES} bytes")
        try:
            keys[name] = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ReconcilerError(f"{path}: not UTF-8 text") from err
    return replace(fleet, public_keys=frozen_map(keys))


def select_hosts(fleet: Fleet, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return list(fleet.host_names())
    known = set(fleet.host_names())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ReconcilerError(
            f"unknown host(s): {', '.join(unknown)} (the fleet has: {', '.join(fleet.host_names())})"
        )
    return list(dict.fromkeys(names))


def render_hosts(fleet: Fleet, names: Sequence[str]) -> dict[str, Desired]:
    from reconciler.domains.render import render_host

    return {name: render_host(fleet, fleet.host(name)) for name in names}


def _target(root: Path, path: str) -> Path:
    rel = path.lstrip("/")
    target = root / rel
    if not path.startswith("/") or ".." in Path(rel).parts or not rel:
        raise ReconcilerError(f"refusing to write {path!r}: not a normalised absolute path")
    return target


def _atomic_write(target: Path, content: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        if target.is_symlink() or target.is_dir():
            raise ReconcilerError(f"{target}: exists and is not a regular file")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_link(target: Path, link_to: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.link-tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(link_to, tmp)
    os.replace(tmp, target)


def write_desired(out: Path, desired: dict[str, Desired], *, per_host: bool) -> list[Written]:
    """Write every file and link of every host under ``out`` (atomically, file by file)."""
    # check every path first, so a refusal writes nothing
    plans: list[tuple[str, Path, Desired]] = []
    for name, d in desired.items():
        root = out / name if per_host else out
        for f in d.files:
            target = _target(root, f.path)
            if target.is_symlink() or target.is_dir():
                raise ReconcilerError(f"{target}: exists and is not a regular file")
        for lk in d.links:
            if _target(root, lk.path).is_dir():
                raise ReconcilerError(f"{_target(root, lk.path)}: exists and is a directory")
        plans.append((name, root, d))
    written: list[Written] = []
    for name, root, d in plans:
        for f in d.files:
            _atomic_write(_target(root, f.path), f.content, f.mode)
        for lk in d.links:
            _atomic_link(_target(root, lk.path), lk.target)
        written.append(
            Written(
                host=name,
                root=root,
                files=tuple(f.path for f in d.files),
                links=tuple(lk.path for lk in d.links),
            )
        )
    return written


def summary(
    desired: dict[str, Desired], written: list[Written], fleet_warnings: Sequence[str]
) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for w in written:
        d = desired[w.host]
        hosts[w.host] = {
            "root": str(w.root),
            "files": list(w.files),
            "links": list(w.links),
            "keypairs": [{"name": k.name, "public_path": k.public_path} for k in d.keypairs],
            "tunnels": [{"name": t.name, "peer": t.peer, "remote": t.remote} for t in d.tunnels],
            "addresses": [{"interface": a.interface, "address": a.address} for a in d.addresses],
            "firewall": d.firewall is not None,
            "services": [s.name for s in d.services],
            "packages": [p.name for p in d.packages if p.state == "present"],
            "pending": [
                {"domain": p.domain.name.lower(), "subject": p.subject, "reason": p.reason} for p in d.pending
            ],
            "warnings": list(d.warnings),
        }
    return {"hosts": hosts, "warnings": list(fleet_warnings)}


def print_text(desired: dict[str, Desired], written: list[Written], fleet_warnings: Sequence[str]) -> None:
    for warning in fleet_warnings:
        print(f"warning: {warning}")
    for w in written:
        d = desired[w.host]
        extra = []
        if d.tunnels:
            extra.append(f"{len(d.tunnels)} tunnels")
        if d.keypairs:
            extra.append("key pair made on the host: " + ", ".join(k.public_path for k in d.keypairs))
        tail = f" ({'; '.join(extra)})" if extra else ""
        links = f", {len(w.links)} links" if w.links else ""
        print(f"{w.host}: {len(w.files)} files{links} -> {w.root}{tail}")
        for p in d.pending:
            print(f"  pending: {p.subject}: {p.reason}")
    pending = sum(len(desired[w.host].pending) for w in written)
    if pending:
        print(
            f"{pending} item(s) pending, everything else rendered. IPsec peers wait for their public "
            "keys: hosts make their key pairs on their first apply, `reconciler keys collect` writes "
            "keys/<host>.pub; to preview with keys you have, use --keys DIR."
        )


def run(args: argparse.Namespace) -> int:
    from reconciler.fleet.load import load_fleet  # heavier (YAML, JSON Schema): only when rendering

    def load() -> Fleet:
        fleet = load_fleet(Path(args.repo))
        return with_keys_from(fleet, args.keys) if args.keys is not None else fleet

    try:
        fleet, results = load_and_render(load, lambda f: select_hosts(f, args.host), limits_from_args(args))
        names = select_hosts(fleet, args.host)
        errors = [r for r in results.values() if isinstance(r, RenderError)]
        if errors:
            for error in errors[:-1]:
                print(f"reconciler render: {error}", file=sys.stderr)
            raise errors[-1]
        desired = {n: r for n, r in results.items() if isinstance(r, Desired)}
        written = write_desired(args.out, desired, per_host=args.all or len(names) > 1)
    except FleetInvalid as err:
        for problem in err.problems:
            print(str(problem), file=sys.stderr)
        print(
            f"reconciler render: {args.repo}: the fleet does not validate; nothing written", file=sys.stderr
        )
        return 1
    except ReconcilerError as err:
        print(f"reconciler render: {err}; nothing written", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary(desired, written, fleet.warnings), indent=2, sort_keys=True))
    else:
        print_text(desired, written, fleet.warnings)
    return 0
