"""Load a fleet repo: files -> safe YAML -> JSON Schema -> semantic checks -> Fleet.

``load_fleet(repo)`` reads a checked-out tree (refusing symlinks that leave it);
``load_fleet_files(files)`` takes repo-relative paths to bytes, so a commit can be loaded
straight from git. Both raise ``FleetInvalid`` with every problem found (errors and warnings,
sorted, each ``FILE:LINE:COL: field: message``); a valid fleet carries its warnings in
``Fleet.warnings``.

Layout (see docs/FLEET.md)::

    fleet.yaml              kind Fleet (exactly one document)
    hosts/**.yaml           kind Host             (several documents per file allowed, "---")
    roles/**.yaml           kind Role
    sites/**.yaml           kind Site
    apparmor/**.yaml        kind AppArmorProfile
    files/**.yaml           kind ManagedFile
    templates/**            Jinja2 sources -> Fleet.templates
    keys/<host>.pub         public keys -> Fleet.public_keys

Hidden files and directories (``.git``, editor swap files) and other top-level entries
(README.md, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import jinja2
import jinja2.sandbox

from reconciler.errors import FleetInvalid, Problem
from reconciler.fleet import schema, semantic
from reconciler.fleet.model import Fleet
from reconciler.fleet.yamlsafe import MAX_FILE_BYTES, YamlDocument, load_documents, short
from reconciler.log import get_logger

log = get_logger(__name__)

MAX_TOTAL_BYTES = 20 * 1024 * 1024
MAX_FILES = 50_000
FLEET_FILES = ("fleet.yaml", "fleet.yml")
DOC_DIRS: Mapping[str, str] = {
    "hosts": "Host",
    "roles": "Role",
    "sites": "Site",
    "apparmor": "AppArmorProfile",
    "files": "ManagedFile",
}
_DIR_OF = {kind: d for d, kind in DOC_DIRS.items()}
TOP_LEVEL = frozenset({*FLEET_FILES, *DOC_DIRS, "templates", "keys"})
YAML_SUFFIXES = (".yaml", ".yml")


def load_fleet(repo: Path) -> Fleet:
    """Load and check the fleet repo checked out at ``repo``."""
    files, problems = read_tree(Path(repo))
    if not files and problems:
        raise FleetInvalid(problems)
    return _load(files, problems)


def load_fleet_files(files: Mapping[str, bytes]) -> Fleet:
    """Load and check a fleet given as repo-relative POSIX path -> content."""
    return _load(dict(files), [])


# ---------------------------------------------------------------- reading a tree


def read_tree(repo: Path) -> tuple[dict[str, bytes], list[Problem]]:
    """Read the files the fleet format uses. Symlinks are followed only inside the repo."""
    problems: list[Problem] = []
    files: dict[str, bytes] = {}
    try:
        root = repo.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return {}, [Problem(str(repo), 0, 0, "", f"cannot read the fleet repo: {why}")]
    if not root.is_dir():
        return {}, [Problem(str(repo), 0, 0, "", "the fleet repo is not a directory")]
    total = 0
    visited = {str(root)}
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.append(
                Problem(prefix.rstrip("/") or ".", 0, 0, "", f"cannot list directory: {exc.strerror}")
            )
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.name.startswith(".") or (not prefix and entry.name not in TOP_LEVEL):
                continue
            target = entry.path
            try:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not _inside(real, str(root)):
                        problems.append(
                            Problem(rel, 0, 0, "", "symlink points outside the fleet repo: refused")
                        )
                        continue
                    target = real
                st = os.stat(target)
            except OSError as exc:
                problems.append(Problem(rel, 0, 0, "", f"cannot read: {exc.strerror or 'broken symlink'}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                real_dir = os.path.realpath(target)
                if real_dir in visited:
                    problems.append(
                        Problem(rel, 0, 0, "", "directory reached twice (symlink loop?): skipped")
                    )
                    continue
                visited.add(real_dir)
                stack.append((target, rel + "/"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(Problem(rel, 0, 0, "", "not a regular file"))
                continue
            if _classify(rel)[0] == "ignore":
                continue
            if len(files) >= MAX_FILES:
                problems.append(Problem(rel, 0, 0, "", f"more than {MAX_FILES} files in the fleet repo"))
                return files, problems
            if st.st_size > MAX_FILE_BYTES:
                problems.append(
                    Problem(rel, 0, 0, "", f"file is {st.st_size} bytes; the limit is {MAX_FILE_BYTES}")
                )
                continue
            total += st.st_size
            if total > MAX_TOTAL_BYTES:
                problems.append(
                    Problem(rel, 0, 0, "", f"the fleet repo holds more than {MAX_TOTAL_BYTES} bytes")
                )
                return files, problems
            try:
                with open(target, "rb") as fh:
                    files[rel] = fh.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                problems.append(Problem(rel, 0, 0, "", f"cannot read: {exc.strerror}"))
    return files, problems


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _classify(rel: str) -> tuple[str, str]:
    """('doc', kind) | ('template', '') | ('key', host) | ('stray', why) | ('ignore', '')."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return ("ignore", "")
    if len(parts) == 1:
        return ("doc", "Fleet") if rel in FLEET_FILES else ("ignore", "")
    top = parts[0]
    if top in DOC_DIRS:
        if rel.endswith(YAML_SUFFIXES):
            return ("doc", DOC_DIRS[top])
        if parts[-1].lower().startswith("readme"):
            return ("ignore", "")
        return ("stray", f"ignored: only *.yaml files are read in {top}/")
    if top == "templates":
        return ("template", "")
    if top == "keys":
        if len(parts) == 2 and parts[1].endswith(".pub"):
            return ("key", parts[1][: -len(".pub")])
        if parts[-1].lower().startswith("readme"):
            return ("ignore", "")
        return ("stray", "ignored: keys/ holds only <host>.pub files")
    return ("ignore", "")


# ---------------------------------------------------------------- the pipeline


def _load(files: dict[str, bytes], problems: list[Problem]) -> Fleet:
    try:
        fleet, found = check_files(files)
    except Exception as exc:  # never a traceback for bad input; the bug is logged
        log.exception("fleet check crashed", error=type(exc).__name__)
        fleet, found = (
            None,
            [Problem("", 0, 0, "", f"internal error while checking the fleet: {type(exc).__name__}")],
        )
    problems = problems + found
    if fleet is None or any(p.severity == "error" for p in problems):
        raise FleetInvalid(problems)
    warnings = tuple(str(p) for p in sorted(problems))
    if warnings != fleet.warnings:  # warnings from reading the tree (e.g. stray files)
        fleet = dataclasses.replace(fleet, warnings=warnings)
    return fleet


def check_files(files: Mapping[str, bytes]) -> tuple[Fleet | None, list[Problem]]:
    """The whole check; returns the Fleet (None if any error) and every problem."""
    problems: list[Problem] = []
    src = semantic.Sources()
    total = 0
    fleet_docs: list[YamlDocument] = []
    for rel in sorted(files):
        data = files[rel]
        what, arg = _classify(rel)
        if what == "ignore":
            continue
        if what == "stray":
            problems.append(Problem(rel, 0, 0, "", arg, "warning"))
            continue
        if len(data) > MAX_FILE_BYTES:
            problems.append(
                Problem(rel, 0, 0, "", f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
            )
            continue
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            problems.append(Problem(rel, 0, 0, "", f"the fleet repo holds more than {MAX_TOTAL_BYTES} bytes"))
            break
        if what == "doc":
            docs = _read_docs(rel, arg, data, src, problems)
            if arg == "Fleet":
                fleet_docs.extend(docs)
        elif what == "template":
            _read_template(rel, data, src, problems)
        elif what == "key":
            src.keys[arg] = (rel, data)
    if not fleet_docs:
        if not any(p.file in FLEET_FILES for p in problems):
            problems.append(
                Problem("fleet.yaml", 0, 0, "", "missing: the fleet repo needs fleet.yaml (kind Fleet)")
            )
    else:
        for extra in fleet_docs[1:]:
            problems.append(extra.problem((), "the fleet repo holds exactly one Fleet document"))
        if fleet_docs[0] in src.docs.get("Fleet", ()):
            src.fleet = fleet_docs[0]
    fleet, found = semantic.check(src)
    problems += found
    if any(p.severity == "error" for p in problems):
        fleet = None
    return fleet, problems


def _read_docs(
    rel: str, kind: str, data: bytes, src: semantic.Sources, problems: list[Problem]
) -> list[YamlDocument]:
    """Parse and schema-check one file's documents; returns every non-empty document."""
    docs, found = load_documents(rel, data)
    problems.extend(found)
    out: list[YamlDocument] = []
    non_empty = [d for d in docs if d.data is not None]
    if not non_empty and not found:
        problems.append(Problem(rel, 1, 1, "", f"no document in this file (expected kind {kind})"))
    for doc in non_empty:
        src.parsed.append((kind, doc))
        ok = doc.ok and _check_header(doc, kind, problems)
        if ok:
            errors = schema.check_document(doc, kind)
            problems.extend(errors)
            ok = not errors
        out.append(doc)
        if ok:
            src.docs.setdefault(kind, []).append(doc)
        elif isinstance(doc.data, dict) and isinstance(doc.data.get("name"), str):
            src.broken.setdefault(kind, set()).add(doc.data["name"])
    return out


def _check_header(doc: YamlDocument, kind: str, problems: list[Problem]) -> bool:
    d = doc.data
    if not isinstance(d, dict):
        problems.append(
            doc.problem(
                (), f"a document must be a mapping with apiVersion and kind, not {schema.type_name(d)}"
            )
        )
        return False
    ok = True
    api = d.get("apiVersion")
    if api is None:
        problems.append(doc.problem((), f"missing apiVersion (expected {schema.API_VERSION})"))
        ok = False
    elif api != schema.API_VERSION:
        problems.append(
            doc.problem(
                ("apiVersion",), f"apiVersion {short(api)} is not supported (expected {schema.API_VERSION})"
            )
        )
        ok = False
    k = d.get("kind")
    where = "fleet.yaml" if kind == "Fleet" else f"{_DIR_OF[kind]}/"
    if k is None:
        problems.append(doc.problem((), f"missing kind (expected {kind})"))
        ok = False
    elif not isinstance(k, str) or k not in schema.KINDS:
        problems.append(doc.problem(("kind",), f"unknown kind {short(k)} (known: {', '.join(schema.KINDS)})"))
        ok = False
    elif k != kind:
        home = "fleet.yaml" if k == "Fleet" else f"{_DIR_OF[k]}/"
        problems.append(
            doc.problem(("kind",), f"a {k} document does not belong in {where} (put it in {home})")
        )
        ok = False
    return ok


def _read_template(rel: str, data: bytes, src: semantic.Sources, problems: list[Problem]) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.append(Problem(rel, line, 0, "", "template is not valid UTF-8"))
        return
    if "\x00" in text:
        problems.append(
            Problem(
                rel, text[: text.index("\x00")].count("\n") + 1, 0, "", "template contains a NUL character"
            )
        )
        return
    try:
        _jinja().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        problems.append(
            Problem(rel, exc.lineno or 0, 0, "", f"template syntax error: {short(exc.message, 200)}")
        )
        return
    except RecursionError:
        problems.append(Problem(rel, 0, 0, "", "template nests too deeply"))
        return
    src.templates[rel] = text


_ENV: list[jinja2.Environment] = []


def _jinja() -> jinja2.Environment:
    if not _ENV:
        _ENV.append(jinja2.sandbox.SandboxedEnvironment(autoescape=False))  # noqa: S701 - config files, not HTML
    return _ENV[0]
