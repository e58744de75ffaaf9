"""Snapshot a host's recorded paths (e.g. /etc) over one Connection, incrementally.

Two round trips at most:

Both scripts use the one host-script framing (``reconciler.host.script``).

1. ``manifest``: one generated script lists every file, symlink and directory under the
   recorded roots with size, mtime, mode, owner, group and link target, and hashes every
   regular file up to ``max_file_bytes`` in full (``sha256sum -z``, under ``timeout``: a file
   that blocks, a FIFO swapped in, or grows while it is read costs at most that long and is
   reported; it never stops the scan). Larger files are not read: their size and mtime say
   whether they changed. The roots travel as script arguments.
2. ``fetch`` (``reconciler.drift.fetch``), only when something changed: ONE script that
   hashes the first and last 64 KiB of the large files that are new or whose size or mtime
   moved (a 40 GB sparse file costs two 64 KiB reads), runs ``reconciler.drift.secretscan``'s
   content rules (``grep -E``) over the files to fetch and names the ones that hold a secret,
   never sending them, and sends the others as ONE ``tar`` stream whose file list travels on
   stdin and whose length is capped (a file swapped for a huge one is cut off, not read).
   Secret files by path and excluded paths are never fetched; fetched bytes go through the
   same content rules again before anything records them (a file that became secret between
   the host's grep and its tar).

Paths are ``str`` holding the host's bytes (``surrogateescape``): any byte string but NUL is a
valid path. ``display_path`` is the form for mail, logs and status (``bad\\xffname.conf``).
Nothing here knows git; ``reconciler.drift.history`` records what this returns.
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from reconciler.drift.fetch import (
    EMPTY_SHA256,
    LIMIT_NOTE,
    MAX_ENDS_PER_SCAN,
    TIMED_OUT,
    Fetched,
    SnapshotError,
    dec,
    fetch_bounded,
    fetch_cap,
    fetch_files,
    path_bytes,
)
from reconciler.drift.secretscan import BUILTIN_SECRET_GLOBS, ContentRules, is_builtin_secret
from reconciler.host.script import Runner, Sections, prelude, run_framed
from reconciler.log import get_logger

__all__ = [
    "BUILTIN_SECRET_GLOBS",
    "DEFAULT_MAX_FILE_BYTES",
    "ENDS_BYTES",
    "Entry",
    "PathPolicy",
    "Snapshot",
    "SnapshotError",
    "display_path",
    "ends_digest",
    "is_builtin_secret",
    "parse_manifest",
    "path_bytes",
    "take_snapshot",
    "fetch_files",
    "fetch_cap",
    "Fetched",
    "EMPTY_SHA256",
]

log = get_logger(__name__)

DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
MIN_MAX_FILE_BYTES = 1024 * 1024  # the first and last blocks of a large file never overlap
ENDS_BYTES = 64 * 1024  # a large file is hashed by its first and last ENDS_BYTES
LARGE_NOTE = "large file: recorded by size, mtime and a hash of its first and last 64 KiB"

# Never recorded: git refuses these path components, and they are some other tool's history.
_NEVER_RECORDED_COMPONENTS = frozenset({".git", ".svn", ".hg"})


@dataclass(frozen=True)
class Entry:
    path: str  # absolute; the host's bytes as str (surrogateescape)
    kind: str  # "file", "link", "dir", "other"
    mode: int  # permission bits incl. setuid/setgid/sticky
    owner: str
    group: str
    size: int = 0
    mtime: float = 0.0
    sha256: str | None = None  # regular files up to the size bound; None when not hashed
    target: str | None = None  # symlinks, as written
    ends_sha256: str | None = None  # larger files: sha256 of the first + last ENDS_BYTES
    large: bool = False  # over the size bound: recorded by size, mtime and ends hash


@dataclass(frozen=True)
class Snapshot:
    host: str
    roots: tuple[str, ...]
    entries: Mapping[str, Entry]  # path -> Entry, secrets and excluded paths already decided
    contents: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))  # fetched
    secrets: frozenset[str] = frozenset()  # recorded by keyed hash only
    too_large: frozenset[str] = frozenset()  # over the size bound: size, mtime, ends hash only
    fetched: int = 0  # files fetched in the tar stream
    warnings: tuple[str, ...] = ()  # display form: never content
    # secrets found by their content (path -> what they hold, e.g. "private key"); a subset of
    # ``secrets``, for the mail's wording only
    content_secrets: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# ---------------------------------------------------------------- names as text


def _escape_char(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if ch == "\\":
        return "\\\\"
    if ch in "\n\t\r":
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch]
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return ch


def display_path(path: str) -> str:
    """``path`` as one safe line of text: bytes that are not UTF-8 as ``\\xff``, control and
    format characters (newline, ESC, bidi overrides) escaped, a backslash doubled. For mail,
    commit messages, logs and status; never used to find the file again."""
    if path.isascii() and path.isprintable() and "\\" not in path:
        return path
    return "".join(_escape_char(c) for c in path)


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


@dataclass(frozen=True)
class PathPolicy:
    roots: tuple[str, ...] = ("/etc",)
    exclude: tuple[str, ...] = ()
    secret_globs: tuple[str, ...] = ()  # fleet secret_paths
    secret_exact: frozenset[str] = frozenset()  # ManagedFile.secret / FileResource.secret paths
    content: ContentRules = field(default_factory=ContentRules)  # secrets by content
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files: size, mtime, ends hash

    def __post_init__(self) -> None:
        if self.max_file_bytes < MIN_MAX_FILE_BYTES:
            raise ValueError(f"max_file_bytes must be at least {MIN_MAX_FILE_BYTES}")

    def excluded(self, path: str) -> bool:
        if any(c in _NEVER_RECORDED_COMPONENTS for c in path.split("/")):
            return True
        return glob_match(path, self.exclude)

    def secret(self, path: str) -> bool:
        if path in self.secret_exact or is_builtin_secret(path):
            return True
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.secret_globs)


# ---------------------------------------------------------------- manifest

# $1 = size bound (bytes), $2 = seconds the hashing may take, then the roots. Framed
# (reconciler.host.script), every field NUL-terminated:
#   listing  8 fields per entry (%y %p %s %T@ %m %u %g %l)
#   hashes   sha256sum -z records "HEX  PATH" of regular files up to the bound; its exit
#            status is the hashing's
#   present  only when hashing failed for some file: PATH of every regular file now present
# Larger files are not read here: the listing's size and mtime say whether one changed.
MANIFEST_SCRIPT = (
    prelude(fixed_path=False)
    + r"""
set -u
bound=$1 stage=$2
shift 2
limit=
if command -v timeout >/dev/null 2>&1; then limit="timeout -k 2 $stage"; fi
listing() {
  for root do
    if [ -e "$root" ] || [ -L "$root" ]; then
      find -P "$root" -printf '%y\0%p\0%s\0%T@\0%m\0%u\0%g\0%l\0'
    fi
  done
}
hashes() {
  for root do
    if [ -e "$root" ]; then find -P "$root" -type f ! -size +"$bound"c -print0; fi
  done | $limit xargs -0 -r sha256sum -z -- 2>/dev/null
  hashed=$?
  return "$hashed"
}
present() {
  for root do
    if [ -e "$root" ]; then find -P "$root" -type f -print0; fi
  done
}
frame listing listing "$@"
hashed=0
frame hashes hashes "$@"
if [ "$hashed" -ne 0 ]; then frame present present "$@"; fi
exit 0
"""
)

_KINDS = {"f": "file", "l": "link", "d": "dir"}


@dataclass(frozen=True)
class Manifest:
    entries: dict[str, Entry]
    present: frozenset[str] | None = None  # regular files still there at the end (when rechecked)
    hashing_cut: bool = False  # hashing timed out: the files it did not reach have no hash


def _fields(sections: Sections, sid: str, what: str) -> tuple[list[bytes], int | None]:
    """The NUL-terminated fields of a section, and its exit status."""
    sec = sections.get(sid)
    if sec is None or sec.exit_status is None:
        raise SnapshotError(f"manifest: truncated output from the host (no end of {what})")
    return sec.body.split(b"\0")[:-1], sec.exit_status


def parse_manifest(sections: Sections) -> Manifest:
    """Parse the manifest script's sections (pure)."""
    records, _ = _fields(sections, "listing", "the listing")
    if len(records) % 8:
        raise SnapshotError("manifest: truncated output from the host")
    entries: dict[str, Entry] = {}
    for k in range(0, len(records), 8):
        y, p, s, t, m, u, g, tgt = records[k : k + 8]
        path = dec(p)
        kind = _KINDS.get(dec(y), "other")
        try:
            entries[path] = Entry(
                path=path,
                kind=kind,
                mode=int(m, 8),
                owner=dec(u),
                group=dec(g),
                size=int(s),
                mtime=float(t),
                target=dec(tgt) if kind == "link" else None,
            )
        except ValueError:
            raise SnapshotError(f"manifest: malformed record for {display_path(path)}") from None
    hashes, status = _fields(sections, "hashes", "the hashes")
    for record in hashes:
        digest, sep2, p = record.partition(b"  ")
        e = entries.get(dec(p))
        if sep2 and len(digest) == 64 and e is not None and e.kind == "file":
            entries[e.path] = replace(e, sha256=digest.decode("ascii"))
    present: frozenset[str] | None = None
    if status != 0:
        now, _ = _fields(sections, "present", "the recheck")
        present = frozenset(dec(p) for p in now)
    return Manifest(entries, present, status == TIMED_OUT)


def _check_roots(roots: Sequence[str]) -> list[str]:
    for r in roots:
        if not r.startswith("/") or "\0" in r or "\n" in r:
            raise ValueError(f"snapshot root must be an absolute path: {r!r}")
    return [posixpath.normpath(r) for r in roots]


async def fetch_manifest(
    conn: Runner,
    roots: Sequence[str],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    stage_timeout: float = 60,
    timeout: float = 120,
) -> Manifest:
    """One round trip: every entry under ``roots`` with metadata, and the sha256 of every
    regular file up to ``max_file_bytes``."""
    args = [str(int(max_file_bytes)), f"{max(1.0, stage_timeout):g}", *_check_roots(roots)]
    run = await run_framed(conn, MANIFEST_SCRIPT, args, timeout=timeout)
    if run.result.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: manifest script failed (exit {run.result.exit_status})")
    return parse_manifest(run.sections)


# ---------------------------------------------------------------- snapshot


def ends_digest(data: bytes) -> str:
    """The large-file hash the host computes: sha256 of the first and last ENDS_BYTES."""
    return hashlib.sha256(data[:ENDS_BYTES] + data[-ENDS_BYTES:]).hexdigest()


def content_id(e: Entry) -> str | None:
    """What identifies a file's content for a secret's keyed hash: its sha256, or for a file
    over the size bound its size and mtime (never read); None when unreadable."""
    if e.sha256 is not None:
        return e.sha256
    if e.large:
        return f"large:{e.size}:{e.mtime!r}"
    return None


RecordedLarge = Callable[[str], tuple[int, float, str] | None]  # path -> (size, mtime, ends hash)
SecretUnchanged = Callable[[str, str], bool]  # (path, content id) -> recorded as this secret?


async def take_snapshot(
    conn: Runner,
    policy: PathPolicy,
    recorded_sha256: Callable[[str], str | None],
    *,
    recorded_large: RecordedLarge | None = None,
    secret_unchanged: SecretUnchanged | None = None,
    timeout: float = 300,
) -> Snapshot:
    """Manifest, then (only if something changed) one fetch: the non-secret regular files up
    to the size bound whose sha256 differs from ``recorded_sha256(path)`` (what the history
    holds; None = nothing), and the ends hash of the larger files whose size or mtime differs
    from ``recorded_large(path)``. ``secret_unchanged(path, sha256)`` says a file recorded as
    a secret (found by its content) still has that content: it is not fetched again.

    One bad file never stops the scan: a file that cannot be read is recorded as unreadable,
    one that vanished during the scan is left out, each with a warning."""
    bound = policy.max_file_bytes
    stage = timeout / 4
    man = await fetch_manifest(conn, policy.roots, max_file_bytes=bound, stage_timeout=stage, timeout=timeout)
    entries: dict[str, Entry] = {}
    secrets: set[str] = set()
    content_secrets: dict[str, str] = {}
    large: set[str] = set()
    to_fetch: list[str] = []
    to_hash_ends: list[str] = []
    warnings: list[str] = [f"hashing {LIMIT_NOTE}"] if man.hashing_cut else []
    for path in sorted(man.entries):
        if policy.excluded(path):
            continue
        e = man.entries[path]
        is_large = e.kind == "file" and e.size > bound
        if is_large:
            e = replace(e, large=True)
        if e.kind == "file" and not is_large and e.sha256 is None:
            kept = recorded_sha256(path) if man.hashing_cut else None
            if man.present is not None and path not in man.present:
                warnings.append(f"{display_path(path)} vanished during the scan")
                continue
            if kept is not None:  # not reached before the time limit: what the history holds stays
                e = replace(e, sha256=kept)
                warnings.append(f"{display_path(path)} not read this scan: its recorded content is kept")
            else:
                warnings.append(f"{display_path(path)} could not be read: recorded as unreadable")
        entries[path] = e
        if e.kind != "file":
            continue
        if policy.secret(path):
            secrets.add(path)  # a large one: by size and mtime, never read
        elif is_large:
            large.add(path)
            known = recorded_large(path) if recorded_large is not None else None
            if known is not None and known[:2] == (e.size, e.mtime):
                entries[path] = replace(e, ends_sha256=known[2])
            else:
                to_hash_ends.append(path)
        elif e.sha256 is None:
            continue
        elif secret_unchanged is not None and secret_unchanged(path, e.sha256):
            secrets.add(path)
        elif e.sha256 != recorded_sha256(path):
            to_fetch.append(path)
    if len(to_hash_ends) > MAX_ENDS_PER_SCAN:
        for path in to_hash_ends[MAX_ENDS_PER_SCAN:]:
            warnings.append(f"{display_path(path)} not read this scan (too many large files changed)")
        to_hash_ends = to_hash_ends[:MAX_ENDS_PER_SCAN]
    got, not_fetched = await fetch_bounded(
        conn, to_fetch, {p: entries[p].size for p in to_fetch}, large=to_hash_ends,
        rules=policy.content, stage_timeout=stage, timeout=timeout,
    )  # fmt: skip
    warnings += got.problems
    for path in to_hash_ends:
        digest = got.ends.get(path)
        if digest is not None:
            entries[path] = replace(entries[path], ends_sha256=digest)
        else:
            warnings.append(f"{display_path(path)} could not be read: recorded as unreadable")
    contents = dict(got.contents)
    for path in to_fetch:
        if path in got.secret:  # found by its content on the host: never sent
            secrets.add(path)
            content_secrets[path] = "secret content"
            continue
        data = contents.get(path)
        if data is None:
            if path in not_fetched:
                entries[path] = replace(entries[path], sha256=None)
                warnings.append(
                    f"{display_path(path)} could not be fetched (it grew or blocked after the manifest?)"
                )
            else:
                warnings.append(f"{display_path(path)} vanished before it could be fetched")
                entries.pop(path, None)
            continue
        e = entries[path]
        found = policy.content.find(data)
        if len(data) > bound:  # swapped for a big file after the manifest
            del contents[path]
            entries[path] = replace(e, sha256=None, ends_sha256=ends_digest(data), size=len(data), large=True)
            if found is None:
                large.add(path)
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest != e.sha256:  # changed between manifest and fetch: keep what we hold
                entries[path] = replace(e, sha256=digest, size=len(data))
        if found is not None:  # became secret after the host's scan: never recorded
            contents.pop(path, None)
            secrets.add(path)
            content_secrets[path] = found
    log.debug("snapshot", host=conn.host, entries=len(entries), fetched=len(contents), secrets=len(secrets))
    return Snapshot(
        host=conn.host,
        roots=policy.roots,
        entries=MappingProxyType(entries),
        contents=MappingProxyType(contents),
        secrets=frozenset(secrets),
        too_large=frozenset(large),
        fetched=len(contents),
        warnings=tuple(warnings),
        content_secrets=MappingProxyType(content_secrets),
    )
