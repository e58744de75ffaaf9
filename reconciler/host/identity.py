"""The identity file on a host (``/etc/reconciler/identity``): which fleet, under which host
name, manages it. Its record, its format (written and parsed, strictly) and what the
observation saw of it. Pure (no I/O); the verdict on it (refuse, record, adopt) is
reconciler.engine.identity's. See docs/ENGINE.md, "Host identity".

The file is small, versioned and line based (``key value``; ``#`` comments are allowed)::

    format reconciler-identity/1
    fleet shop-prod
    fleet_id 6f1c2e0a-5d7b-4c1e-9a53-2f0d8c7b1e44
    host web1

The fleet id is ``id:`` of fleet.yaml when pinned, else derived from the fleet's name
(``derived_fleet_id``): two fleets with the same name and no pinned id look like one fleet.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

IDENTITY_PATH = "/etc/reconciler/identity"
IDENTITY_DIR = "/etc/reconciler"
FORMAT = "reconciler-identity/1"
MAX_LINES = 64  # the observation reads at most this many lines (the format has 4 and comments)

FLEET_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{7,63}$"  # also in schemas/fleet.schema.json
_FLEET_ID = re.compile(FLEET_ID_PATTERN)
_FLEET_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_KEYS = ("format", "fleet", "fleet_id", "host")


@dataclass(frozen=True)
class HostIdentity:
    """A fleet's claim on a host: what the identity file records."""

    fleet: str
    fleet_id: str
    host: str

    def describe(self) -> str:
        return f"fleet '{self.fleet}' (id {self.fleet_id}) as host '{self.host}'"


def derived_fleet_id(name: str) -> str:
    """The fleet id of a fleet.yaml without ``id:``: a stable hash of the fleet's name."""
    digest = hashlib.sha256(b"reconciler fleet id v1\0" + name.encode()).hexdigest()
    return f"derived-{digest[:16]}"


# ---------------------------------------------------------------- the file


def format_identity(ident: HostIdentity) -> bytes:
    # no comment, nothing but the four lines: every observation reads it with the shell's read
    # builtin, one byte per read(2) (~1 us each)
    lines = (f"format {FORMAT}", f"fleet {ident.fleet}", f"fleet_id {ident.fleet_id}", f"host {ident.host}")
    return "".join(f"{line}\n" for line in lines).encode()


class IdentityFormatError(ValueError):
    """The identity file is not one this reconciler writes; ``unsupported``: a newer format."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def parse_identity(data: bytes) -> HostIdentity:
    """Strict: UTF-8, ``key value`` lines, each key once, nothing unknown; raises IdentityFormatError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityFormatError("not UTF-8 text") from None
    lines = text.splitlines()
    if len(lines) >= MAX_LINES:
        raise IdentityFormatError(f"more than {MAX_LINES - 1} lines")
    found: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if key not in _KEYS:
            raise IdentityFormatError(f"line {n}: unknown key {_short(key)}")
        if key in found:
            raise IdentityFormatError(f"line {n}: {key} given twice")
        found[key] = value
    fmt = found.get("format")
    if fmt is None:
        raise IdentityFormatError("no format line")
    if fmt != FORMAT:
        if fmt.startswith("reconciler-identity/"):
            raise IdentityFormatError(f"format {_short(fmt)}, this one reads {FORMAT}", unsupported=True)
        raise IdentityFormatError(f"format {_short(fmt)} is not {FORMAT}")
    missing = [k for k in _KEYS if k not in found]
    if missing:
        raise IdentityFormatError(f"no {', '.join(missing)} line")
    for key, pattern in (("fleet", _FLEET_NAME), ("fleet_id", _FLEET_ID), ("host", _HOST_NAME)):
        if not pattern.match(found[key]):
            raise IdentityFormatError(f"{key} {_short(found[key])} is not a valid {key.replace('_', ' ')}")
    return HostIdentity(fleet=found["fleet"], fleet_id=found["fleet_id"], host=found["host"])


def _short(value: str, limit: int = 40) -> str:
    """A bounded, escaped repr: the file may hold anything (terminal escapes included)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---------------------------------------------------------------- what the observation saw


class Seen(StrEnum):
    ABSENT = "absent"  # no identity file: a host no fleet has claimed yet
    FILE = "file"  # a valid identity file (``SeenIdentity.identity``)
    GARBAGE = "garbage"  # a regular file that is not a valid identity file
    UNSUPPORTED = "unsupported"  # written by a newer reconciler (a newer format)
    LINK = "link"  # the identity path is a symbolic link (never followed)
    NOT_FILE = "notfile"  # a directory, FIFO, socket or device
    DIR_LINK = "dirlink"  # /etc/reconciler is a symbolic link
    DIR_NOT_DIR = "dirnotdir"  # /etc/reconciler is not a directory
    NOT_OWNER = "notowner"  # the file or /etc/reconciler is not owned by root


@dataclass(frozen=True)
class SeenIdentity:
    kind: Seen
    identity: HostIdentity | None = None
    detail: str = ""  # why a file is garbage


def parse_section(body: bytes) -> SeenIdentity:
    """The observation's identity section: ``state KIND`` then, for ``file``, the file's lines."""
    head, _, rest = body.partition(b"\n")
    state = head.decode("ascii", errors="replace").strip().removeprefix("state ")
    try:
        kind = Seen(state)
    except ValueError:
        return SeenIdentity(Seen.GARBAGE, detail=f"unexpected probe output {_short(state)}")
    if kind is not Seen.FILE:
        return SeenIdentity(kind)
    try:
        return SeenIdentity(Seen.FILE, parse_identity(rest))
    except IdentityFormatError as err:
        return SeenIdentity(Seen.UNSUPPORTED if err.unsupported else Seen.GARBAGE, detail=str(err))
