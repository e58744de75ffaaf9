"""A snapshot turned into what the history will hold (``Prepared``): the metadata of every
path and the blobs that changed; secrets as a keyed hash, large files as size, mtime and the
hash of their ends, names git cannot hold as metadata only. Pure: no git, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.drift.history_meta import ChangeSet, HistoryError, Recorded, diff_meta, git_storable
from reconciler.drift.snapshot import LARGE_NOTE, Entry, Snapshot, content_id, display_path, path_bytes

SECRET_MARKER_HEAD = b"# reconciler: secret file, content never stored\n"


@dataclass(frozen=True)
class Prepared:
    """A snapshot turned into what the history will hold, before it is committed."""

    host: str
    meta: Mapping[str, Recorded]
    previous: Mapping[str, Recorded]
    changes: ChangeSet
    blobs: Mapping[str, tuple[str, bytes | None]] = field(default_factory=dict)  # (git mode, data)


def _git_mode(e: Entry) -> str:
    if e.kind == "link":
        return "120000"
    return "100755" if e.mode & 0o111 else "100644"


def prepare_snapshot(
    snap: Snapshot, prev: Mapping[str, Recorded], secret_digest: Callable[[str, str | None], str]
) -> Prepared:
    """``prev``: what the history holds for the host; ``secret_digest(path, sha256)``: the
    history's keyed hash of a secret file."""
    meta: dict[str, Recorded] = {}
    blobs: dict[str, tuple[str, bytes | None]] = {}
    for path, e in snap.entries.items():
        storable = git_storable(path, e.kind)
        if e.kind == "file":
            if path in snap.secrets:
                digest = secret_digest(path, content_id(e))
                rec = Recorded("file", e.mode, e.owner, e.group, secret=digest, stored="secret")
                data = SECRET_MARKER_HEAD + f"# {digest} (keyed hash; the key is not in this repo)\n".encode()
            elif e.large and e.ends_sha256 is not None:
                rec = Recorded(
                    "file", e.mode, e.owner, e.group, stored="large",
                    size=e.size, mtime=e.mtime, ends_sha256=e.ends_sha256,
                )  # fmt: skip
                data = (
                    f"# reconciler: {LARGE_NOTE}\n# size {e.size}\n# mtime {e.mtime!r}\n"
                    f"# sha256 of the first and last 64 KiB {e.ends_sha256}\n"
                ).encode()
            elif e.sha256 is None:
                rec = Recorded("file", e.mode, e.owner, e.group, stored="unreadable")
                data = b"# reconciler: content not readable\n"
            elif not storable:
                rec = Recorded("file", e.mode, e.owner, e.group, sha256=e.sha256, stored="hash-only")
                meta[path] = rec
                continue
            else:
                rec = Recorded("file", e.mode, e.owner, e.group, sha256=e.sha256)
                old = prev.get(path)
                if old is not None and old.sha256 == e.sha256 and old.stored == "content":
                    if (old.mode & 0o111 != 0) == (e.mode & 0o111 != 0):
                        meta[path] = rec
                        continue  # same blob, same git mode: nothing to write
                if path not in snap.contents:
                    if old is not None and old.sha256 == e.sha256:
                        blobs[path] = (_git_mode(e), None)  # git mode change only: reuse the blob
                        meta[path] = rec
                        continue
                    shown = display_path(path)
                    raise HistoryError(f"{snap.host}:{shown}: content changed but was not fetched")
                data = snap.contents[path]
            if storable:
                blobs[path] = (_git_mode(e), data)
            meta[path] = rec
        elif e.kind == "link":
            meta[path] = Recorded("link", e.mode, e.owner, e.group, target=e.target or "", stored="none")
            old = prev.get(path)
            if storable and (old is None or old.target != e.target or old.kind != "link"):
                blobs[path] = ("120000", path_bytes(e.target or ""))
        else:
            meta[path] = Recorded(e.kind, e.mode, e.owner, e.group, stored="none")
    return Prepared(snap.host, meta, prev, diff_meta(snap.host, prev, meta), blobs)
