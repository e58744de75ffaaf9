"""The second round trip of a snapshot (``reconciler.drift.snapshot``), only when something
changed: ONE framed script (``reconciler.host.script``) that hashes the ends of the large
files, names the files whose content holds a secret (never sending them) and sends the others
as one ``tar`` stream of capped length whose file list travels on stdin."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.drift.secretscan import ContentRules
from reconciler.errors import Transient
from reconciler.host.script import Runner, prelude, run_framed

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMED_OUT = 124  # timeout(1)'s exit status
LIMIT_NOTE = "stopped after its time limit (a file that blocks or grows while read?)"


class SnapshotError(Transient):
    """The host did not answer the manifest or fetch as expected."""


def path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- fetch

# $1 = the most bytes of tar to send, $2 = the content rules (ERE, one per line), $3 = seconds
# each stage may take, then the large files to hash by their first and last 64 KiB. Stdin,
# after the framing nonce: the regular files to fetch, relative to /, NUL-terminated.
# Framed (reconciler.host.script; every tool's own stderr goes to /dev/null):
#   tar   one tar stream of the files to fetch whose content matches no rule, cut at $1 bytes:
#         tar writes each file's size as it stats it, so only a file swapped for a bigger one
#         after the manifest can grow the stream; the cut stops it there
#   meta  NUL-terminated: PATH, HEX pairs for the large files, then "" and "ENDS<status>"; the
#         files to fetch whose content matches a rule (never put into tar), then "" and
#         "SCAN<status>" (written to a private temp file while tar runs)
# A matching file is found by one grep over each batch; only a batch with a match is searched
# file by file. grep skips FIFOs and devices (-D skip) and, on binary data, the holes of
# sparse files.
FETCH_SCRIPT = (
    prelude(keep_stdin=True, fixed_path=False)
    + r"""
set -u
cap=$1 rules=$2 stage=$3
shift 3
exec 2>/dev/null
cd / || exit 1
meta=$(mktemp) || exit 1
trap 'rm -f "$meta"' EXIT
exec 3>"$meta"
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
send() {
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
}
frame tar send
exec 3>&-
frame meta cat "$meta"
exit 0
"""
)
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


def _meta(data: bytes) -> tuple[dict[str, str], set[str], list[str]]:
    """The fetch script's meta section: (large file -> ends hash, secret names, timed-out stages)."""
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
                        ends[dec(pending[k])] = pending[k + 1].decode("ascii")
            else:
                secret.update("/" + dec(p) for p in pending if p)
            if status == str(TIMED_OUT).encode():
                what = "hashing large files" if tag == b"ENDS" else "the secret content scan"
                problems.append(f"{what} {LIMIT_NOTE}")
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
    run = await run_framed(conn, FETCH_SCRIPT, args, stdin_after=stdin, timeout=timeout)
    tar_sec, meta = run.sections.get("tar"), run.sections.get("meta")
    if run.result.exit_status != 0 or tar_sec is None or meta is None or meta.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: fetching files failed (exit {run.result.exit_status})")
    stream = tar_sec.body
    ends, secret, problems = _meta(meta.body)
    out: dict[str, bytes] = {}
    reading: str | None = None
    if paths:
        try:
            with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
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
            if len(stream) < limit:
                raise SnapshotError(f"host {conn.host}: unreadable tar stream: {err}") from None
    # at the cap, the members after the cut are missing although their files may exist
    cut = bool(paths) and len(stream) >= limit
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
