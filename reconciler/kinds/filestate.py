"""File records as the observation reads them: ``find -printf`` records, ``sha256sum -z``
digests, the judgement of the directories above a path (``reconciler.host.pathsafe.refusal``),
and the read-back a change script appends to prove what it wrote (same record format).
Parsers only; the probe that prints them is ``reconciler.kinds.files``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from reconciler.host.pathsafe import Batch, Rule, refusal
from reconciler.host.script import Section, split_sections
from reconciler.kinds.observed import FileState

# the observation's file record: find -printf, 7 NUL-terminated fields (parse_find_records); the
# path-safety helper prints the same records (kind "R": refused, the reason in the 6th field)
FIND_FMT = r"%p\0%y\0%m\0%u\0%g\0%l\0%U\0"


_KINDS = {"f": "file", "l": "link", "d": "dir"}


def parse_find_records(body: bytes) -> dict[str, FileState]:
    """``find -printf '%p\\0%y\\0%m\\0%u\\0%g\\0%l\\0%U\\0'`` records (7 NUL-separated fields
    each), or the helper's (``reconciler.host.pathsafe``: kind ``R`` = refused, the reason in place
    of the link target)."""
    fields = body.split(b"\0")
    out: dict[str, FileState] = {}
    for i in range(0, len(fields) - 6, 7):
        raw_path, kind, mode_s, owner, group, target, uid_s = fields[i : i + 7]
        path = raw_path.decode("utf-8", errors="surrogateescape")
        if kind == b"R":
            why = target.decode("utf-8", errors="replace")
            out[path] = FileState(path=path, exists=False, kind="other", refused=why)
            continue
        try:
            mode: int | None = int(mode_s, 8)
        except ValueError:
            mode = None
        k = _KINDS.get(kind.decode("ascii", errors="replace"), "other")
        out[path] = FileState(
            path=path,
            exists=True,
            kind=k,
            mode=mode,
            owner=owner.decode("utf-8", errors="replace"),
            group=group.decode("utf-8", errors="replace"),
            link_target=target.decode("utf-8", errors="surrogateescape") if k == "link" else None,
            uid=int(uid_s) if uid_s.isdigit() else None,
        )
    return out


def parse_sha256(body: bytes) -> dict[str, str]:
    """``sha256sum -z`` output: ``<64 hex>  <path>\\0`` (names unescaped with -z)."""
    out: dict[str, str] = {}
    for rec in body.split(b"\0"):
        if len(rec) < 67 or rec[64:65] != b" ":
            continue
        digest = rec[:64].decode("ascii", errors="replace")
        path = rec[66:].decode("utf-8", errors="surrogateescape")
        out[path] = digest.lower()
    return out


def file_states(
    asked: Iterable[str], records: Mapping[str, FileState], hashes: Mapping[str, str]
) -> dict[str, FileState]:
    """One FileState per asked path: found by find (with its hash, if hashed) or missing."""
    out: dict[str, FileState] = {}
    for p in asked:
        st = records.get(p)
        if st is None:
            out[p] = FileState(path=p, exists=False)
        elif st.kind == "file" and p in hashes:
            out[p] = replace(st, sha256=hashes[p])
        else:
            out[p] = st
    return out


def judged(states: Mapping[str, FileState], records: Mapping[str, FileState]) -> dict[str, FileState]:
    """``states`` with every path whose directories are not root's alone replaced by a refused
    state (the reason; nothing read through it): ``records`` holds their ``find`` records."""
    out = dict(states)
    by_dir: dict[str, str | None] = {}  # files share directories: judge each chain once
    for p in states:
        d = p.rpartition("/")[0]
        if d not in by_dir:
            by_dir[d] = refusal(p, records)
        why = by_dir[d]
        if why:
            out[p] = FileState(path=p, exists=False, kind="other", refused=why)
    return out


def owned_states(
    found: Mapping[str, FileState], owned_dirs: Iterable[str], records: Mapping[str, FileState]
) -> dict[str, FileState]:
    """Files found under the owned directories, refused when the directories above (and the
    owned directory itself) are not root's alone."""
    dirs = sorted(owned_dirs, key=len, reverse=True)
    out: dict[str, FileState] = {}
    for p, st in found.items():
        d = next((d for d in dirs if p.startswith(d.rstrip("/") + "/")), None)
        why = refusal(p, records, upto=d) if d is not None else None
        out[p] = FileState(path=p, exists=False, kind="other", refused=why) if why else st
    return out


# the only messages find/sha256sum give for a path that is not there
_MISSING = ("No such file or directory", "Not a directory")


def files_ok(sec: Section, what: str, errors: list[str]) -> bool:
    """find/sha256sum exit 1 when a path is missing (expected); anything else is an error."""
    if sec.exit_status is None:
        errors.append(f"{what}: no answer (observation cut short)")
        return False
    odd = [ln for ln in sec.stderr.splitlines() if ln.strip() and not any(m in ln for m in _MISSING)]
    if sec.exit_status not in (0, 1) or (sec.exit_status == 1 and odd):
        detail = f": {odd[0][:300]}" if odd else ""
        errors.append(f"{what}: exit {sec.exit_status}{detail}")
        return False
    return True


def read_back(batch: Batch, paths: Mapping[str, Rule]) -> None:
    """Add to a helper run (after the operations that changed ``paths``) a read of what they
    are now: the observation's file record and sha256 (sections ``rb.st``/``rb.hs``), so the
    change is proven without another round trip. Never through a link."""
    for p, rule in paths.items():
        batch.stat(p, rule, hash_it=True)
    batch.flush("rb")


def parse_read_back(stdout: bytes, paths: Sequence[str], marker: str) -> dict[str, FileState] | None:
    """The file states ``read_back`` printed; None if the output is not all there."""
    secs = split_sections(stdout, nonce=marker)
    st, hs = secs.get("rb.st"), secs.get("rb.hs")
    if st is None or hs is None or st.exit_status is None or hs.exit_status != 0:
        return None
    return file_states(paths, parse_find_records(st.body), parse_sha256(hs.body))
