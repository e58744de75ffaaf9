"""The fleet repo's tree at a commit, from ``git archive``'s tar: regular files only, links
resolved inside the repo, capped in count (the archive itself is capped in bytes)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import PurePosixPath

from reconciler.errors import FleetInvalid, Problem

MAX_FILES = 20_000


def files_from_tar(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    problems: list[Problem] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        if len(members) > MAX_FILES:
            raise FleetInvalid([Problem("", 0, 0, "", f"more than {MAX_FILES} files in the repo")])
        for m in members:
            name = m.name
            if m.isdir() or m.type == tarfile.XGLTYPE or name == "pax_global_header":
                continue
            if m.issym():
                links[name] = m.linkname
            elif m.isfile():
                f = tar.extractfile(m)
                files[name] = f.read() if f is not None else b""
            else:
                problems.append(Problem(name, 0, 0, "", "not a regular file"))
    for name, target in links.items():
        resolved = _resolve_link(name, target, links)
        if resolved is None or resolved not in files:
            problems.append(Problem(name, 0, 0, "", "symlink leaves the repo or does not point to a file"))
        else:
            files[name] = files[resolved]
    if problems:
        raise FleetInvalid(problems)
    return files


def _resolve_link(name: str, target: str, links: Mapping[str, str], depth: int = 0) -> str | None:
    if depth > 20 or target.startswith("/"):
        return None
    parts: list[str] = list(PurePosixPath(name).parent.parts)
    for part in PurePosixPath(target).parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    resolved = "/".join(parts)
    if resolved in links:
        return _resolve_link(resolved, links[resolved], links, depth + 1)
    return resolved
