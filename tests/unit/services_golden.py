"""Golden files for the services domains: render a fleet's AppArmor, Apache and managed files
per host and compare with tests/golden/services/<name>/ (``UPDATE_GOLDEN=1`` rewrites them).

Layout per host: ``<host>/MANIFEST`` (every file, link and handler with its metadata) and
``<host>/tree/<absolute path>`` (each rendered file's content; links are only in MANIFEST).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reconciler.domains import apache, apparmor, files
from reconciler.domains.render import merge
from reconciler.fleet.model import Fleet, Host
from reconciler.kinds.resources import Desired, Validator

GOLDEN_ROOT = Path(__file__).resolve().parents[1] / "golden" / "services"


def render_services(fleet: Fleet, host: Host) -> Desired:
    """Only the three services domains, merged like the real renderer merges them."""
    fragments = [
        ("apparmor", apparmor.render(fleet, host)),
        ("apache", apache.render(fleet, host)),
        ("files", files.render(fleet, host)),
    ]
    return merge(host.name, fragments)


def _validator(v: Validator) -> str:
    parts = [f"argv={list(v.argv)}"]
    if v.tree_root:
        parts.append(f"tree_root={v.tree_root}")
    if v.env:
        parts.append(f"env={dict(v.env)}")
    if v.needs_command:
        parts.append(f"needs_command={v.needs_command}")
    return " ".join(parts)


def manifest(desired: Desired) -> str:
    lines: list[str] = []
    for f in desired.files:
        extra = [f"domain={f.domain.name}", f"mode={f.mode:04o}", f"owner={f.owner}", f"group={f.group}"]
        if f.handler:
            extra.append(f"handler={f.handler}")
        if f.needs_package:
            extra.append(f"needs_package={f.needs_package}")
        if f.secret:
            extra.append("secret")
        lines.append(f"file {f.path} " + " ".join(extra))
        lines += [f"  validator {_validator(v)}" for v in f.validators]
    for lk in desired.links:
        extra = [f"domain={lk.domain.name}"]
        if lk.handler:
            extra.append(f"handler={lk.handler}")
        if lk.needs_package:
            extra.append(f"needs_package={lk.needs_package}")
        lines.append(f"link {lk.path} -> {lk.target} " + " ".join(extra))
    for h in desired.handlers:
        lines.append(f"handler {h.name} reload={list(h.reload)} only_if_running={list(h.only_if_running)}")
        lines += [f"  validator {_validator(v)}" for v in h.validators]
    return "\n".join(lines) + "\n"


def snapshot(fleet: Fleet) -> dict[str, bytes]:
    """relative golden path -> bytes, for every host of the fleet."""
    out: dict[str, bytes] = {}
    for host in fleet.hosts:
        desired = render_services(fleet, host)
        out[f"{host.name}/MANIFEST"] = manifest(desired).encode()
        for f in desired.files:
            out[f"{host.name}/tree{f.path}"] = f.content
    return out


def check_golden(name: str, fleet: Fleet) -> None:
    """Assert the fleet renders exactly tests/golden/services/<name>/; rewrite it when
    UPDATE_GOLDEN=1."""
    root = GOLDEN_ROOT / name
    got = snapshot(fleet)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        if root.exists():
            shutil.rmtree(root)
        for rel, data in got.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    assert root.is_dir(), f"no golden files in {root}: run with UPDATE_GOLDEN=1"
    have = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    missing = sorted(set(got) - set(have))
    extra = sorted(set(have) - set(got))
    assert not missing, f"rendered but not in golden {root}: {missing} (UPDATE_GOLDEN=1 to accept)"
    assert not extra, f"in golden {root} but no longer rendered: {extra} (UPDATE_GOLDEN=1 to accept)"
    for rel in sorted(got):
        assert got[rel].decode() == have[rel].decode(), f"{root / rel} differs (UPDATE_GOLDEN=1 to accept)"
