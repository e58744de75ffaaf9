"""Snapshot a host's recorded paths (e.g. /etc) over one Connection, incrementally.

Two round trips at most:

1. ``manifest``: one generated script (``find -printf`` + ``sha256sum -z``) lists every file,
   symlink and directory under the recorded roots with size, mtime, mode, owner, group, the
   link target and the sha256 of regular files. The roots travel as script arguments.
2. ``fetch``: only the regular files whose sha256 differs from what the history already holds
   are fetched, in ONE ``tar`` stream whose file list travels on stdin. Secret files, files
   over ``max_file_bytes`` and excluded paths are never fetched.

Nothing here knows git; ``reconciler.history`` records what this returns.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from reconciler.errors import Transient
from reconciler.log import get_logger
from reconciler.remote import Runner

log = get_logger(__name__)

DEFAULT_MAX_FILE_BYTES = 8 * 1024 * 1024

# Always recorded by hash only, whatever the fleet says (globs on absolute paths; "*" also
# matches "/"). Files under any directory named "private" are secrets too (see is_builtin_secret).
BUILTIN_SECRET_GLOBS: tuple[str, ...] = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh/ssh_host_*_key",
    "/etc/racoon/*.key",
    "*/ipsec.key",
    "*.key",
    "/etc/ipsec.secrets",
    "/etc/ipsec.d/private/*",
    "/etc/swanctl/rsa/*",
    "/etc/swanctl/ecdsa/*",
    "/etc/swanctl/pkcs8/*",
    "/etc/swanctl/pkcs12/*",
    "/etc/security/opasswd",
    "/etc/ppp/*-secrets",
    "/etc/wireguard/*",
    "/etc/mysql/debian.cnf",
    "/etc/krb5.keytab",
)

# Never recorded: git refuses these path components, and they are some other tool's history.
_NEVER_RECORDED_COMPONENTS = frozenset({".git", ".svn", ".hg"})


class SnapshotError(Transient):
    """The host did not answer the manifest or fetch as expected."""


@dataclass(frozen=True)
class Entry:
    path: str  # absolute
    kind: str  # "file", "link", "dir", "other"
    mode: int  # permission bits incl. setuid/setgid/sticky
    owner: str
    group: str
    size: int = 0
    mtime: float = 0.0
    sha256: str | None = None  # regular files; None when unreadable
    target: str | None = None  # symlinks, as written


@dataclass(frozen=True)
class Snapshot:
    host: str
    roots: tuple[str, ...]
    entries: Mapping[str, Entry]  # path -> Entry, secrets and excluded paths already decided
    contents: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))  # fetched
    secrets: frozenset[str] = frozenset()  # recorded by keyed hash only
    too_large: frozenset[str] = frozenset()  # recorded by sha256 only
    fetched: int = 0  # files fetched in the tar stream
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------- path policy


def glob_match(path: str, patterns: Iterable[str]) -> bool:
    """True if ``path`` or one of its parent directories matches one of the globs."""
    pats = tuple(patterns)
    if not pats:
        return False
    p = path
    while True:
        if any(fnmatch.fnmatchcase(p, pat) for pat in pats):
            return True
        parent = posixpath.dirname(p)
        if parent == p:
            return False
        p = parent


def is_builtin_secret(path: str) -> bool:
    parts = path.split("/")
    if "private" in parts[:-1]:  # anything under a directory named "private"
        return True
    return any(fnmatch.fnmatchcase(path, pat) for pat in BUILTIN_SECRET_GLOBS)


@dataclass(frozen=True)
class PathPolicy:
    roots: tuple[str, ...] = ("/etc",)
    exclude: tuple[str, ...] = ()
    secret_globs: tuple[str, ...] = ()  # fleet secret_paths
    secret_exact: frozenset[str] = frozenset()  # ManagedFile.secret / FileResource.secret paths

    def excluded(self, path: str) -> bool:
        if any(c in _NEVER_RECORDED_COMPONENTS for c in path.split("/")):
            return True
        return glob_match(path, self.exclude)

    def secret(self, path: str) -> bool:
        if path in self.secret_exact or is_builtin_secret(path):
            return True
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.secret_globs)


# ---------------------------------------------------------------- manifest

# Positional parameters are the roots. Output (all NUL-terminated fields):
#   "reconciler-manifest-v1" then 8 fields per entry (%y %p %s %T@ %m %u %g %l), then "END",
#   then sha256sum -z records "HEX  PATH".
MANIFEST_SCRIPT = r"""
set -u
printf 'reconciler-manifest-v1\0'
for root in "$@"; do
  if [ -e "$root" ] || [ -L "$root" ]; then
    find -P "$root" -printf '%y\0%p\0%s\0%T@\0%m\0%u\0%g\0%l\0'
  fi
done
printf 'END\0'
for root in "$@"; do
  if [ -e "$root" ] || [ -L "$root" ]; then
    find -P "$root" -type f -print0
  fi
done | xargs -0 -r sha256sum -z --
exit 0
"""

_KINDS = {"f": "file", "l": "link", "d": "dir"}


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def parse_manifest(data: bytes) -> dict[str, Entry]:
    """Parse the manifest script's output (pure)."""
    head, sep, rest = data.partition(b"\0")
    if head != b"reconciler-manifest-v1" or not sep:
        raise SnapshotError("manifest: unexpected output from the host (no header)")
    fields = rest.split(b"\0")
    entries: dict[str, Entry] = {}
    i = 0
    while i < len(fields) and fields[i] != b"END":
        rec = fields[i : i + 8]
        if len(rec) < 8:
            raise SnapshotError("manifest: truncated output from the host")
        y, p, s, t, m, u, g, tgt = rec
        i += 8
        path = _dec(p)
        kind = _KINDS.get(_dec(y), "other")
        try:
            entries[path] = Entry(
                path=path,
                kind=kind,
                mode=int(m, 8),
                owner=_dec(u),
                group=_dec(g),
                size=int(s),
                mtime=float(t),
                target=_dec(tgt) if kind == "link" else None,
            )
        except ValueError:
            raise SnapshotError(f"manifest: malformed record for {path!r}") from None
    if i >= len(fields):
        raise SnapshotError("manifest: truncated output from the host (no END)")
    for record in fields[i + 1 :]:
        if not record:
            continue
        digest, sep2, p = record.partition(b"  ")
        if not sep2 or len(digest) != 64:
            continue
        path = _dec(p)
        e = entries.get(path)
        if e is not None and e.kind == "file":
            entries[path] = replace(e, sha256=digest.decode("ascii"))
    return entries


async def fetch_manifest(conn: Runner, roots: Sequence[str], *, timeout: float = 120) -> dict[str, Entry]:
    """One round trip: every entry under ``roots`` with metadata and sha256."""
    for r in roots:
        if not r.startswith("/") or "\0" in r or "\n" in r:
            raise ValueError(f"snapshot root must be an absolute path: {r!r}")
    res = await conn.run_script(MANIFEST_SCRIPT, args=[posixpath.normpath(r) for r in roots], timeout=timeout)
    if res.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: manifest script failed (exit {res.exit_status})")
    return parse_manifest(res.stdout)


# ---------------------------------------------------------------- fetch

FETCH_ARGV = ("tar", "--null", "--no-recursion", "--verbatim-files-from", "-C", "/", "-cf", "-", "-T", "-")


async def fetch_files(conn: Runner, paths: Sequence[str], *, timeout: float = 300) -> dict[str, bytes]:
    """One round trip: the content of ``paths`` (regular files) as one tar stream.

    Files that vanished meanwhile are simply missing from the result."""
    if not paths:
        return {}
    wanted = {p.lstrip("/"): p for p in paths}
    stdin = b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in wanted)
    res = await conn.run(FETCH_ARGV, stdin=stdin, timeout=timeout)
    # tar exits 1 ("file changed as we read it") or 2 (a file vanished) and still writes the rest.
    if res.exit_status not in (0, 1, 2):
        raise SnapshotError(f"host {conn.host}: fetching files failed (tar exit {res.exit_status})")
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(res.stdout), mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or name not in wanted:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    out[wanted[name]] = f.read()
    except tarfile.TarError as err:
        raise SnapshotError(f"host {conn.host}: unreadable tar stream: {err}") from None
    return out


# ---------------------------------------------------------------- snapshot


async def take_snapshot(
    conn: Runner,
    policy: PathPolicy,
    recorded_sha256: Callable[[str], str | None],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = 300,
) -> Snapshot:
    """Manifest, then fetch only the non-secret regular files whose sha256 differs from
    ``recorded_sha256(path)`` (what the history holds; None = nothing recorded)."""
    raw = await fetch_manifest(conn, policy.roots, timeout=timeout)
    entries: dict[str, Entry] = {}
    secrets: set[str] = set()
    too_large: set[str] = set()
    to_fetch: list[str] = []
    for path in sorted(raw):
        if policy.excluded(path):
            continue
        e = raw[path]
        entries[path] = e
        if e.kind != "file":
            continue
        if policy.secret(path):
            secrets.add(path)
            continue
        if e.size > max_file_bytes:
            too_large.add(path)
            continue
        if e.sha256 is not None and e.sha256 != recorded_sha256(path):
            to_fetch.append(path)
    contents = await fetch_files(conn, to_fetch, timeout=timeout)
    warnings: list[str] = []
    for path in to_fetch:
        data = contents.get(path)
        if data is None:
            warnings.append(f"{path} vanished before it could be fetched")
            entries.pop(path, None)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != entries[path].sha256:  # changed between manifest and fetch: keep what we hold
            entries[path] = replace(entries[path], sha256=digest, size=len(data))
    log.debug("snapshot", host=conn.host, entries=len(entries), fetched=len(contents), secrets=len(secrets))
    return Snapshot(
        host=conn.host,
        roots=policy.roots,
        entries=MappingProxyType(entries),
        contents=MappingProxyType(contents),
        secrets=frozenset(secrets),
        too_large=frozenset(too_large),
        fetched=len(contents),
        warnings=tuple(warnings),
    )
