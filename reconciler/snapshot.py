"""Snapshot a host's recorded paths (e.g. /etc) over one Connection, incrementally.

Two round trips at most:

1. ``manifest``: one generated script lists every file, symlink and directory under the
   recorded roots with size, mtime, mode, owner, group and link target; hashes every regular
   file up to ``max_file_bytes`` in full (``sha256sum -z``) and every larger one by its first
   and last 64 KiB only (so a 40 GB sparse file costs two 64 KiB reads); and names the files
   whose content holds a secret (ONE ``grep -E`` with ``reconciler.secretscan``'s rules), so
   their content never leaves the host. Each stage runs under ``timeout``: a file that blocks
   (a FIFO swapped in) or grows while it is read costs at most that long and is reported, it
   never stops the scan. The roots and the rules travel as script arguments.
2. ``fetch``: only the regular files whose sha256 differs from what the history already holds
   are fetched, in ONE ``tar`` stream whose file list travels on stdin and whose length is
   capped (a file swapped for a huge one is cut off, not read). Secret files, large files and
   excluded paths are never fetched; fetched content is checked by the same content rules
   again before anything records it (a file that became secret after the manifest).

Paths are ``str`` holding the host's bytes (``surrogateescape``): any byte string but NUL is a
valid path. ``display_path`` is the form for mail, logs and status (``bad\\xffname.conf``).
Nothing here knows git; ``reconciler.history`` records what this returns.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from reconciler.errors import Transient
from reconciler.log import get_logger
from reconciler.remote import Runner
from reconciler.secretscan import BUILTIN_SECRET_GLOBS, ContentRules, is_builtin_secret

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
    "take_snapshot",
]

log = get_logger(__name__)

DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
MIN_MAX_FILE_BYTES = 1024 * 1024  # the first and last blocks of a large file never overlap
ENDS_BYTES = 64 * 1024  # a large file is hashed by its first and last ENDS_BYTES
LARGE_NOTE = "large file: recorded by size, mtime and a hash of its first and last 64 KiB"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Never recorded: git refuses these path components, and they are some other tool's history.
_NEVER_RECORDED_COMPONENTS = frozenset({".git", ".svn", ".hg"})


class SnapshotError(Transient):
    """The host did not answer the manifest or fetch as expected."""


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


def path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


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

# $1 = size bound (bytes), $2 = content rules (ERE, one per line), $3 = seconds per stage,
# then the roots. Output (every field NUL-terminated):
#   "reconciler-manifest-v2"
#   8 fields per entry (%y %p %s %T@ %m %u %g %l)                                     "END"
#   sha256sum -z records "HEX  PATH" of regular files up to the bound                 "END"
#   PATH, HEX pairs: sha256 of the first + last 64 KiB of larger files                "END"
#   PATH of every file up to the bound whose content matches a rule (grep -l -Z)      "END"
#   three exit statuses (full hashes, large files, content rules)
#   only when hashing failed for some file: PATH of every regular file now present    "END"
# A path always starts with "/", so it never reads as "END"; a hash record starts with hex.
MANIFEST_SCRIPT = r"""
set -u
bound=$1 rules=$2 stage=$3
shift 3
LC_ALL=C
export LC_ALL
limit=
if command -v timeout >/dev/null 2>&1; then limit="timeout -k 2 $stage"; fi
regular() {  # regular small|large ROOTS...: NUL-separated regular files up to / over the bound
  which=$1
  shift
  for root in "$@"; do
    if [ -e "$root" ]; then
      if [ "$which" = small ]; then
        find -P "$root" -type f ! -size +"$bound"c -print0
      else
        find -P "$root" -type f -size +"$bound"c -print0
      fi
    fi
  done
}
printf 'reconciler-manifest-v2\0'
for root in "$@"; do
  if [ -e "$root" ] || [ -L "$root" ]; then
    find -P "$root" -printf '%y\0%p\0%s\0%T@\0%m\0%u\0%g\0%l\0'
  fi
done
printf 'END\0'
regular small "$@" | $limit xargs -0 -r sha256sum -z -- 2>/dev/null
hashed=$?
printf 'END\0'
regular large "$@" | $limit xargs -0 -r sh -c '
st=0
for f do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    printf "%s\0" "$f"
    { head -c 65536 -- "$f"; tail -c 65536 -- "$f"; } 2>/dev/null |
      sha256sum | { read -r h _; printf "%s\0" "$h"; }
  else
    st=1
  fi
done
exit $st' sh
ends=$?
printf 'END\0'
regular small "$@" | $limit xargs -0 -r grep -l -Z -a -s -D skip -E -e "$rules" -- 2>/dev/null
scanned=$?
printf 'END\0%s\0%s\0%s\0' "$hashed" "$ends" "$scanned"
if [ "$hashed" -ne 0 ] || [ "$ends" -ne 0 ]; then
  for root in "$@"; do
    if [ -e "$root" ]; then find -P "$root" -type f -print0; fi
  done
fi
printf 'END\0'
exit 0
"""

_KINDS = {"f": "file", "l": "link", "d": "dir"}
_TIMED_OUT_B = b"124"  # timeout(1)'s exit status


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Manifest:
    entries: dict[str, Entry]
    content_secrets: frozenset[str] = frozenset()  # files whose content matched a rule
    present: frozenset[str] | None = None  # regular files still there at the end (when rechecked)
    problems: tuple[str, ...] = ()  # stages that timed out (display text)
    hashing_cut: bool = False  # a hashing stage timed out: unhashed files were not all read


def _section(fields: list[bytes], i: int, what: str) -> tuple[list[bytes], int]:
    """The fields from ``i`` up to the next "END" and the index after it."""
    try:
        end = fields.index(b"END", i)
    except ValueError:
        raise SnapshotError(f"manifest: truncated output from the host (no end of {what})") from None
    return fields[i:end], end + 1


def parse_manifest(data: bytes) -> Manifest:
    """Parse the manifest script's output (pure)."""
    head, sep, rest = data.partition(b"\0")
    if head != b"reconciler-manifest-v2" or not sep:
        raise SnapshotError("manifest: unexpected output from the host (no header)")
    fields = rest.split(b"\0")
    records, i = _section(fields, 0, "the listing")
    if len(records) % 8:
        raise SnapshotError("manifest: truncated output from the host")
    entries: dict[str, Entry] = {}
    for k in range(0, len(records), 8):
        y, p, s, t, m, u, g, tgt = records[k : k + 8]
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
            raise SnapshotError(f"manifest: malformed record for {display_path(path)}") from None
    hashes, i = _section(fields, i, "the hashes")
    for record in hashes:
        digest, sep2, p = record.partition(b"  ")
        e = entries.get(_dec(p))
        if sep2 and len(digest) == 64 and e is not None and e.kind == "file":
            entries[e.path] = replace(e, sha256=digest.decode("ascii"))
    ends, i = _section(fields, i, "the large files")
    for k in range(0, len(ends) - 1, 2):  # a pair cut by a timeout is dropped
        e = entries.get(_dec(ends[k]))
        digest = ends[k + 1]
        if e is not None and e.kind == "file" and len(digest) == 64 and digest != EMPTY_SHA256.encode():
            entries[e.path] = replace(e, ends_sha256=digest.decode("ascii"))  # empty: unreadable
    matched, i = _section(fields, i, "the content scan")
    statuses = fields[i : i + 3]
    if len(statuses) < 3:
        raise SnapshotError("manifest: truncated output from the host (no statuses)")
    stages = ("hashing", "hashing large files", "the secret content scan")
    problems = [
        f"{what} stopped after its time limit (a file that blocks or grows while read?)"
        for what, st in zip(stages, statuses, strict=True)
        if st == _TIMED_OUT_B
    ]
    present: frozenset[str] | None = None
    if statuses[0] != b"0" or statuses[1] != b"0":
        now, _ = _section(fields, i + 3, "the recheck")
        present = frozenset(_dec(p) for p in now)
    cut = _TIMED_OUT_B in statuses[:2]
    return Manifest(entries, frozenset(_dec(p) for p in matched), present, tuple(problems), cut)


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
    rules: ContentRules | None = None,
    stage_timeout: float = 60,
    timeout: float = 120,
) -> Manifest:
    """One round trip: every entry under ``roots`` with metadata and hashes, and the files
    whose content is secret."""
    args = [str(int(max_file_bytes)), (rules or ContentRules()).ere, f"{max(1.0, stage_timeout):g}"]
    res = await conn.run_script(MANIFEST_SCRIPT, args=args + _check_roots(roots), timeout=timeout)
    if res.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: manifest script failed (exit {res.exit_status})")
    return parse_manifest(res.stdout)


# ---------------------------------------------------------------- fetch

# $1 = the most bytes to send: tar writes each file's size as it stats it, so only a file
# swapped for a bigger one between the manifest and this fetch can grow the stream; the cap
# cuts it there (the members before it are kept).
FETCH_SCRIPT = r"""
LC_ALL=C tar --null --no-recursion --verbatim-files-from -C / -cf - -T - 2>/dev/null | head -c "$1"
"""
_TAR_BLOCK = 512


def fetch_cap(sizes: Iterable[tuple[str, int]]) -> int:
    """Bytes a tar stream of files of these sizes may take: data, headers, long names, end."""
    total = 20 * _TAR_BLOCK  # end-of-archive blocks and the record padding
    for path, size in sizes:
        blocks = -(-size // _TAR_BLOCK) + 3 + -(-len(path_bytes(path)) // _TAR_BLOCK)
        total += blocks * _TAR_BLOCK
    return total


@dataclass(frozen=True)
class Fetched:
    contents: dict[str, bytes]
    cut: bool = False  # the stream ended at the cap: missing files may still exist
    cut_in: str | None = None  # the file whose content the cap cut (it grew)


async def fetch_files(
    conn: Runner, paths: Sequence[str], *, cap: int | None = None, timeout: float = 300
) -> Fetched:
    """One round trip: the content of ``paths`` (regular files) as one tar stream of at most
    ``cap`` bytes. Files that vanished meanwhile are missing from the result."""
    if not paths:
        return Fetched({})
    wanted = {p.lstrip("/"): p for p in paths}
    stdin = b"".join(path_bytes(p) + b"\0" for p in wanted)
    limit = cap if cap is not None else 1 << 62
    res = await conn.run_script(FETCH_SCRIPT, args=[str(limit)], stdin_after=stdin, timeout=timeout)
    if res.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: fetching files failed (exit {res.exit_status})")
    out: dict[str, bytes] = {}
    reading: str | None = None
    try:
        with tarfile.open(fileobj=io.BytesIO(res.stdout), mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or name not in wanted:
                    continue
                reading = wanted[name]
                f = tar.extractfile(member)
                if f is not None:
                    data = f.read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    out[wanted[name]] = data
                    reading = None
    except tarfile.TarError as err:
        if len(res.stdout) < limit:
            raise SnapshotError(f"host {conn.host}: unreadable tar stream: {err}") from None
    # at the cap, the members after the cut are missing although their files may exist
    cut = len(res.stdout) >= limit
    return Fetched(out, cut=cut, cut_in=reading if cut else None)


async def fetch_bounded(
    conn: Runner, paths: Sequence[str], sizes: Mapping[str, int], *, timeout: float
) -> tuple[dict[str, bytes], set[str]]:
    """The content of ``paths`` and the files that could not be fetched although they may
    exist (a file that grew past its listed size, and whatever the cap cut after it: fetched
    again once without it). Missing from both: vanished."""
    contents: dict[str, bytes] = {}
    unfetched: set[str] = set()
    todo = list(paths)
    for attempt in range(2):
        got = await fetch_files(conn, todo, cap=fetch_cap((p, sizes[p]) for p in todo), timeout=timeout)
        contents.update(got.contents)
        if not got.cut:
            break
        if got.cut_in:
            unfetched.add(got.cut_in)
        todo = [p for p in todo if p not in got.contents and p not in unfetched]
        if attempt == 1:
            unfetched.update(todo)
        elif not todo:
            break
    return contents, unfetched


# ---------------------------------------------------------------- snapshot


def ends_digest(data: bytes) -> str:
    """The large-file hash the host computes: sha256 of the first and last ENDS_BYTES."""
    return hashlib.sha256(data[:ENDS_BYTES] + data[-ENDS_BYTES:]).hexdigest()


async def take_snapshot(
    conn: Runner,
    policy: PathPolicy,
    recorded_sha256: Callable[[str], str | None],
    *,
    timeout: float = 300,
) -> Snapshot:
    """Manifest, then fetch only the non-secret regular files up to the size bound whose
    sha256 differs from ``recorded_sha256(path)`` (what the history holds; None = nothing).

    One bad file never stops the scan: a file that cannot be read is recorded as unreadable,
    one that vanished during the scan is left out, each with a warning."""
    bound = policy.max_file_bytes
    man = await fetch_manifest(
        conn, policy.roots, max_file_bytes=bound, rules=policy.content, stage_timeout=timeout / 4,
        timeout=timeout,
    )  # fmt: skip
    entries: dict[str, Entry] = {}
    secrets: set[str] = set()
    content_secrets: dict[str, str] = {}
    large: set[str] = set()
    to_fetch: list[str] = []
    warnings: list[str] = list(man.problems)
    for path in sorted(man.entries):
        if policy.excluded(path):
            continue
        e = man.entries[path]
        if e.kind == "file" and e.sha256 is None and e.ends_sha256 is None:
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
        if path in man.content_secrets:
            content_secrets[path] = "secret content"
        if policy.secret(path) or path in man.content_secrets:
            secrets.add(path)
        elif e.sha256 is None and e.ends_sha256 is not None:
            large.add(path)
        elif e.sha256 is not None and e.sha256 != recorded_sha256(path):
            to_fetch.append(path)
    contents, not_fetched = await fetch_bounded(
        conn, to_fetch, {p: entries[p].size for p in to_fetch}, timeout=timeout
    )
    for path in to_fetch:
        data = contents.get(path)
        if data is None:
            if path in not_fetched:
                entries[path] = replace(entries[path], sha256=None)
                warnings.append(f"{display_path(path)} could not be fetched (it grew after the manifest?)")
            else:
                warnings.append(f"{display_path(path)} vanished before it could be fetched")
                entries.pop(path, None)
            continue
        e = entries[path]
        found = policy.content.find(data)
        if len(data) > bound:  # swapped for a big file after the manifest
            del contents[path]
            entries[path] = replace(e, sha256=None, ends_sha256=ends_digest(data), size=len(data))
            if found is None:
                large.add(path)
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest != e.sha256:  # changed between manifest and fetch: keep what we hold
                entries[path] = replace(e, sha256=digest, size=len(data))
        if found is not None:  # became secret after the manifest's scan: never recorded
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
