"""Snapshot a host's recorded paths (e.g. /etc) over one Connection, incrementally.

Two round trips at most:

1. ``manifest``: one generated script lists every file, symlink and directory under the
   recorded roots with size, mtime, mode, owner, group and link target, and hashes every
   regular file up to ``max_file_bytes`` in full (``sha256sum -z``, under ``timeout``: a file
   that blocks, a FIFO swapped in, or grows while it is read costs at most that long and is
   reported; it never stops the scan). Larger files are not read: their size and mtime say
   whether they changed. The roots travel as script arguments.
2. ``fetch``, only when something changed: ONE script that hashes the first and last 64 KiB
   of the large files that are new or whose size or mtime moved (a 40 GB sparse file costs two
   64 KiB reads), runs ``reconciler.drift.secretscan``'s content rules (``grep -E``) over the files
   to fetch and names the ones that hold a secret, never sending them, and sends the others as
   ONE ``tar`` stream whose file list travels on stdin and whose length is capped (a file
   swapped for a huge one is cut off, not read). Secret files by path and excluded paths are
   never fetched; fetched bytes go through the same content rules again before anything
   records them (a file that became secret between the host's grep and its tar).

Paths are ``str`` holding the host's bytes (``surrogateescape``): any byte string but NUL is a
valid path. ``display_path`` is the form for mail, logs and status (``bad\\xffname.conf``).
Nothing here knows git; ``reconciler.drift.history`` records what this returns.
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

from reconciler.drift.secretscan import BUILTIN_SECRET_GLOBS, ContentRules, is_builtin_secret
from reconciler.errors import Transient
from reconciler.host.script import Runner
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

# $1 = size bound (bytes), $2 = seconds the hashing may take, then the roots. Output (every
# field NUL-terminated):
#   "reconciler-manifest-v2"
#   8 fields per entry (%y %p %s %T@ %m %u %g %l)                                     "END"
#   sha256sum -z records "HEX  PATH" of regular files up to the bound                 "END"
#   the hashing's exit status
#   only when hashing failed for some file: PATH of every regular file now present    "END"
# A path always starts with "/", so it never reads as "END"; a hash record starts with hex.
# Larger files are not read here: the listing's size and mtime say whether one changed.
MANIFEST_SCRIPT = r"""
set -u
bound=$1 stage=$2
shift 2
LC_ALL=C
export LC_ALL
limit=
if command -v timeout >/dev/null 2>&1; then limit="timeout -k 2 $stage"; fi
printf 'reconciler-manifest-v2\0'
for root in "$@"; do
  if [ -e "$root" ] || [ -L "$root" ]; then
    find -P "$root" -printf '%y\0%p\0%s\0%T@\0%m\0%u\0%g\0%l\0'
  fi
done
printf 'END\0'
for root in "$@"; do
  if [ -e "$root" ]; then find -P "$root" -type f ! -size +"$bound"c -print0; fi
done | $limit xargs -0 -r sha256sum -z -- 2>/dev/null
hashed=$?
printf 'END\0%s\0' "$hashed"
if [ "$hashed" -ne 0 ]; then
  for root in "$@"; do
    if [ -e "$root" ]; then find -P "$root" -type f -print0; fi
  done
fi
printf 'END\0'
exit 0
"""

_KINDS = {"f": "file", "l": "link", "d": "dir"}
_TIMED_OUT_B = b"124"  # timeout(1)'s exit status
_LIMIT_NOTE = "stopped after its time limit (a file that blocks or grows while read?)"


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Manifest:
    entries: dict[str, Entry]
    present: frozenset[str] | None = None  # regular files still there at the end (when rechecked)
    hashing_cut: bool = False  # hashing timed out: the files it did not reach have no hash


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
    if i >= len(fields):
        raise SnapshotError("manifest: truncated output from the host (no status)")
    status = fields[i]
    present: frozenset[str] | None = None
    if status != b"0":
        now, _ = _section(fields, i + 1, "the recheck")
        present = frozenset(_dec(p) for p in now)
    return Manifest(entries, present, status == _TIMED_OUT_B)


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
    res = await conn.run_script(MANIFEST_SCRIPT, args=args, timeout=timeout)
    if res.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: manifest script failed (exit {res.exit_status})")
    return parse_manifest(res.stdout)


# ---------------------------------------------------------------- fetch

# Only when something changed. $1 = the most bytes of tar to send, $2 = the content rules (ERE,
# one per line), $3 = seconds each stage may take, then the large files to hash by their first
# and last 64 KiB. Stdin: the regular files to fetch, relative to /, NUL-terminated.
# On fd 3 (the channel's stderr; every tool's own stderr goes to /dev/null), NUL-terminated:
#   PATH, HEX pairs for the large files, then "" and "ENDS<status>";
#   the files to fetch whose content matches a rule (never put into tar), then "" and
#   "SCAN<status>".
# On stdout: one tar stream of the other files, cut at $1 bytes: tar writes each file's size
# as it stats it, so only a file swapped for a bigger one after the manifest can grow the
# stream; the cut stops it there. A matching file is found by one grep over each batch; only a
# batch with a match is searched file by file. grep skips FIFOs and devices (-D skip) and, on
# binary data, the holes of sparse files.
FETCH_SCRIPT = r"""
set -u
cap=$1 rules=$2 stage=$3
shift 3
exec 3>&2 2>/dev/null
LC_ALL=C
export LC_ALL
cd / || exit 1
limit=
if command -v timeout >/dev/null 2>&1; then limit="timeout -k 2 $stage"; fi
if [ $# -gt 0 ]; then
  $limit sh -c '
for f do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    h=$({ head -c 65536 -- "$f"; tail -c 65536 -- "$f"; } | sha256sum)
    printf "%s\0%s\0" "$f" "${h%% *}" >&3
  fi
done' sh "$@"
  printf '\0ENDS%s\0' "$?" >&3
fi
{
  $limit xargs -0 -r sh -c '
if grep -q -s -D skip -E -e "$0" -- "$@"; then
  for f do
    if grep -q -s -D skip -E -e "$0" -- "$f"; then
      printf "%s\0" "$f" >&3
    else
      printf "%s\0" "$f"
    fi
  done
else
  printf "%s\0" "$@"
fi' "$rules"
  printf '\0SCAN%s\0' "$?" >&3
} | tar --null --no-recursion --verbatim-files-from -cf - -T - | head -c "$cap"
exit 0
"""
_TAR_BLOCK = 512
MAX_ENDS_PER_SCAN = 500  # large files hashed in one fetch (their names travel as arguments)


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
    secret: frozenset[str] = frozenset()  # their content matched a rule on the host: not sent
    ends: Mapping[str, str] = field(default_factory=dict)  # large file -> sha256 of its ends
    cut: bool = False  # the stream ended at the cap: missing files may still exist
    cut_in: str | None = None  # the file whose content the cap cut (it grew)
    problems: tuple[str, ...] = ()  # stages that timed out (display text)
    unscanned: bool = False  # the content scan did not finish: missing files may still exist


def _fd3(data: bytes) -> tuple[dict[str, str], set[str], list[str]]:
    """The fetch script's fd 3: (large file -> ends hash, secret names, timed-out stages)."""
    fields = data.split(b"\0")
    ends: dict[str, str] = {}
    secret: set[str] = set()
    problems: list[str] = []
    i = 0
    pending: list[bytes] = []
    while i < len(fields):
        f = fields[i]
        if f == b"" and i + 1 < len(fields) and fields[i + 1][:4] in (b"ENDS", b"SCAN"):
            tag, status = fields[i + 1][:4], fields[i + 1][4:]
            if tag == b"ENDS":
                for k in range(0, len(pending) - 1, 2):
                    if len(pending[k + 1]) == 64 and pending[k + 1] != EMPTY_SHA256.encode():
                        ends[_dec(pending[k])] = pending[k + 1].decode("ascii")
            else:
                secret.update("/" + _dec(p) for p in pending if p)
            if status == _TIMED_OUT_B:
                what = "hashing large files" if tag == b"ENDS" else "the secret content scan"
                problems.append(f"{what} {_LIMIT_NOTE}")
            pending = []
            i += 2
            continue
        pending.append(f)
        i += 1
    return ends, secret, problems


async def fetch_files(
    conn: Runner,
    paths: Sequence[str],
    *,
    large: Sequence[str] = (),
    rules: ContentRules | None = None,
    cap: int | None = None,
    stage_timeout: float = 60,
    timeout: float = 300,
) -> Fetched:
    """One round trip: the content of ``paths`` (regular files) as one tar stream of at most
    ``cap`` bytes, leaving out (and naming) those whose content matches ``rules`` on the host;
    and the ends hash of the ``large`` files. Files that vanished meanwhile are missing."""
    if not paths and not large:
        return Fetched({})
    wanted = {p.lstrip("/"): p for p in paths}
    stdin = b"".join(path_bytes(p) + b"\0" for p in wanted)
    limit = cap if cap is not None else 1 << 62
    args = [str(limit), (rules or ContentRules()).ere, f"{max(1.0, stage_timeout):g}", *large]
    res = await conn.run_script(FETCH_SCRIPT, args=args, stdin_after=stdin, timeout=timeout)
    if res.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: fetching files failed (exit {res.exit_status})")
    ends, secret, problems = _fd3(res.stderr)
    out: dict[str, bytes] = {}
    reading: str | None = None
    if paths:
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
    cut = bool(paths) and len(res.stdout) >= limit
    unscanned = any("content scan" in p for p in problems)
    return Fetched(out, frozenset(secret), ends, cut, reading if cut else None, tuple(problems), unscanned)


async def fetch_bounded(
    conn: Runner,
    paths: Sequence[str],
    sizes: Mapping[str, int],
    *,
    large: Sequence[str] = (),
    rules: ContentRules | None = None,
    stage_timeout: float = 60,
    timeout: float = 300,
) -> tuple[Fetched, set[str]]:
    """``fetch_files``, and the files that could not be fetched although they may exist (a
    file that grew past its listed size, and whatever the cap cut after it: fetched again once
    without it). Missing from both the result and that set: vanished."""
    contents: dict[str, bytes] = {}
    secret: set[str] = set()
    unfetched: set[str] = set()
    todo = list(paths)
    first: Fetched | None = None
    for attempt in range(2):
        got = await fetch_files(
            conn, todo, large=large if attempt == 0 else (), rules=rules,
            cap=fetch_cap((p, sizes[p]) for p in todo), stage_timeout=stage_timeout, timeout=timeout,
        )  # fmt: skip
        first = first or got
        contents.update(got.contents)
        secret |= got.secret
        if got.unscanned:  # not classified: neither sent nor named; keep them apart
            unfetched.update(p for p in todo if p not in got.contents and p not in got.secret)
            break
        if not got.cut:
            break
        if got.cut_in:
            unfetched.add(got.cut_in)
        todo = [p for p in todo if p not in got.contents and p not in got.secret and p not in unfetched]
        if attempt == 1:
            unfetched.update(todo)
        elif not todo:
            break
    assert first is not None
    merged = Fetched(contents, frozenset(secret), first.ends, problems=first.problems)
    return merged, unfetched


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
    warnings: list[str] = [f"hashing {_LIMIT_NOTE}"] if man.hashing_cut else []
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
