"""What verify reads on a host for IPsec besides swanctl: the peers' public keys (hashed here,
from the PEM files the host sends) and charon's log since the last run. Pure."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_TAIL_HEADER = re.compile(r"^==> (.+) <==$")
_PEM_PUBLIC = re.compile(r"-----BEGIN PUBLIC KEY-----\s*(.*?)\s*-----END PUBLIC KEY-----", re.DOTALL)


def parse_key_hashes(text: str) -> dict[str, str]:
    """The peer keys section: file name -> sha256 of the key's DER (SubjectPublicKeyInfo, as
    ``openssl pkey -pubout -outform DER`` prints it), or ``unreadable``.

    The host sends the PEM files as they are (``tail -v -n +1``: a ``==> path <==`` header
    before each); hashing here costs microseconds instead of one openssl run per peer on the
    host. Older facts (``<file> <hash>`` lines) are read too."""
    if not text.startswith("==> "):
        out: dict[str, str] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        head = _TAIL_HEADER.match(line)
        if head:
            current = files.setdefault(posixpath.basename(head.group(1)), [])
        elif current is not None:
            current.append(line)
    return {name: _der_hash("\n".join(lines)) for name, lines in files.items()}


def _der_hash(pem: str) -> str:
    found = _PEM_PUBLIC.search(pem)
    if found is None:
        return "unreadable"
    try:
        der = base64.b64decode("".join(found.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        return "unreadable"
    return hashlib.sha256(der).hexdigest() if der else "unreadable"


# ---------------------------------------------------------------- charon log

_TAG = re.compile(r"<([^|>]+)\|\d+>")
# A single "retransmit N of request" is not an error: under load a DPD or rekey request is
# often answered on its first retransmit. A peer that never answers ends in "giving up after N
# retransmits" / "peer not responding", which are.
_ERROR = re.compile(
    r"\b(error|errors|failed|failure|unable|giving up|no trusted|no matching|no proposal|"
    r"NO_PROPOSAL_CHOSEN|AUTHENTICATION_FAILED|TS_UNACCEPTABLE|INVALID_[A-Z_]+|"
    r"peer not responding|deleting IKE_SA .* after timeout)\b",
    re.IGNORECASE,
)
# harmless on Debian 12 hosts without a TPM/tss2 library, and capability lines
_NOISE = re.compile(
    r"plugin '[^']+': failed to load|TPM 2\.0 - could not load|failed to load .*tss2|"
    r"HA config misses|loading .* failed: No such file|loaded plugins: ",
    re.IGNORECASE,
)
# untagged responder-side lines name the addresses: "no IKE config found for B...A, sending ..."
_ADDRS = re.compile(r"\bfor (\d+\.\d+\.\d+\.\d+)\.\.\.(\d+\.\d+\.\d+\.\d+)")
_IKE_UP = re.compile(r"IKE_SA (\S+?)\[\d+\] established")
_CHILD_UP = re.compile(r"CHILD_SA (\S+?)\{\d+\} established")


@dataclass(frozen=True)
class LogError:
    line: str
    connection: str | None  # the IKE_SA/connection name the line is tagged with
    recovered: bool  # the same connection established again later in the read part


@dataclass(frozen=True)
class LogRead:
    present: bool
    lines_read: int
    truncated: bool
    errors: tuple[LogError, ...]
    sad_install_failures: tuple[str, ...]  # "unable to install ... IPsec SA (SAD) in kernel"


def parse_log_section(text: str, addr_to_conn: Mapping[str, str] | None = None) -> LogRead:
    """The ``log`` section: ``CURSOR ino offset size start`` then the new log text (cached:
    every pair of a host reads the same section)."""
    return _parse_log_cached(text, tuple(sorted((addr_to_conn or {}).items())))


@functools.lru_cache(maxsize=256)
def _parse_log_cached(text: str, addrs: tuple[tuple[str, str], ...]) -> LogRead:
    addr_to_conn = dict(addrs)
    lines = text.splitlines()
    if not lines or lines[0] == "NOLOG":
        return LogRead(False, 0, False, (), ())
    head = lines[0].split()
    truncated = len(head) == 5 and head[0] == "CURSOR" and head[4] != head[2]
    body = lines[1:] if head and head[0] == "CURSOR" else lines
    return analyse_log(body, truncated=truncated, addr_to_conn=addr_to_conn)


def analyse_log(
    lines: Sequence[str], *, truncated: bool = False, addr_to_conn: Mapping[str, str] | None = None
) -> LogRead:
    """Error lines of the charon log, each attributed to a connection (by its ``<conn|n>``
    tag, or by the peer address an untagged line names) and marked recovered when that
    connection established an SA later in the lines read."""
    by_addr = addr_to_conn or {}
    found: list[tuple[int, str, str | None]] = []
    last_up: dict[str, int] = {}
    sad: list[str] = []
    for i, line in enumerate(lines):
        tag = _TAG.search(line)
        conn = tag.group(1) if tag else None
        if conn is None and (addrs := _ADDRS.search(line)):
            conn = by_addr.get(addrs.group(2)) or by_addr.get(addrs.group(1))
        up = _IKE_UP.search(line) or _CHILD_UP.search(line)
        if up:
            # a CHILD_SA line is tagged with its IKE_SA's connection (<mesh-web2|3>)
            last_up[conn or up.group(1)] = i
        if "(SAD) in kernel" in line and "unable to install" in line:
            sad.append(line.strip())
        if _ERROR.search(line) and not _NOISE.search(line):
            found.append((i, line.strip(), conn))
    errors = tuple(
        LogError(text, conn, conn is not None and last_up.get(conn, -1) > i) for i, text, conn in found
    )
    return LogRead(True, len(lines), truncated, errors, tuple(sad))


# ---------------------------------------------------------------- checks
