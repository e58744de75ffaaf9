"""What the /etc history records for a path (one line of ``meta/<host>.json``), how two
records differ (the change notes of commit messages and mails: never content), and which
paths git can hold in a tree. Pure: no git, no I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reconciler.drift.snapshot import LARGE_NOTE, display_path
from reconciler.errors import ReconcilerError

SECRET_NOTE = "secret (content hidden)"  # noqa: S105 (a label, not a password)
# how a file's content is held: "content" (a blob), "secret" (a keyed hash), "large" (size,
# mtime, hash of its ends), "unreadable", "hash-only" (a name git refuses: sha256, no blob);
# "too-large" (full sha256, no blob) was written by earlier versions
_LARGE = ("large", "too-large")


class HistoryError(ReconcilerError):
    """The history repo could not be read or written. Loud: never treated as "no drift"."""


@dataclass(frozen=True)
class Recorded:
    """What the history holds for one path (one line of meta/<host>.json)."""

    kind: str
    mode: int
    owner: str
    group: str
    sha256: str | None = None  # non-secret regular files
    secret: str | None = None  # "hmac-sha256:<hex>" for secrets
    target: str | None = None
    stored: str = "content"  # "content", "secret", "large", "unreadable", "hash-only", "none"
    size: int | None = None  # large files
    mtime: float | None = None  # large files
    ends_sha256: str | None = None  # large files: sha256 of the first and last 64 KiB

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "kind": self.kind,
            "mode": f"{self.mode:04o}",
            "owner": self.owner,
            "group": self.group,
        }
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.secret is not None:
            d["secret"] = self.secret
        if self.target is not None:
            d["target"] = self.target
        if self.stored != "content":
            d["stored"] = self.stored
        if self.size is not None:
            d["size"] = self.size
        if self.mtime is not None:
            d["mtime"] = self.mtime
        if self.ends_sha256 is not None:
            d["ends_sha256"] = self.ends_sha256
        return d

    @staticmethod
    def from_json(d: Mapping[str, object]) -> Recorded:
        def opt(k: str) -> str | None:
            v = d.get(k)
            return None if v is None else str(v)

        return Recorded(
            kind=str(d["kind"]),
            mode=int(str(d["mode"]), 8),
            owner=str(d["owner"]),
            group=str(d["group"]),
            sha256=opt("sha256"),
            secret=opt("secret"),
            target=opt("target"),
            stored=str(d.get("stored", "content")),
            size=None if d.get("size") is None else int(str(d["size"])),
            mtime=None if d.get("mtime") is None else float(str(d["mtime"])),
            ends_sha256=opt("ends_sha256"),
        )


@dataclass(frozen=True)
class Change:
    path: str
    what: str  # "new", "removed", "changed", "secret-changed", "meta", "type"
    detail: str = ""  # e.g. "mode 0644 -> 0600"; never content


@dataclass(frozen=True)
class ChangeSet:
    host: str
    changes: tuple[Change, ...] = ()

    def paths(self, *whats: str) -> tuple[str, ...]:
        return tuple(c.path for c in self.changes if c.what in whats)

    @property
    def new(self) -> tuple[str, ...]:
        return self.paths("new")

    @property
    def removed(self) -> tuple[str, ...]:
        return self.paths("removed")

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.paths("changed", "secret-changed", "type", "meta")))

    @property
    def secret_changed(self) -> tuple[str, ...]:
        return self.paths("secret-changed")

    def __bool__(self) -> bool:
        return bool(self.changes)


# ---------------------------------------------------------------- pure parts


def encode_meta(meta: Mapping[str, Recorded]) -> bytes:
    """One path per line, sorted, so diffs of the metadata are readable."""
    lines = [json.dumps(p) + ": " + json.dumps(meta[p].to_json(), sort_keys=True) for p in sorted(meta)]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def decode_meta(data: bytes) -> dict[str, Recorded]:
    try:
        raw = json.loads(data)
        return {str(p): Recorded.from_json(v) for p, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HistoryError(f"history metadata is unreadable: {err}") from None


def _secret_change(a: Recorded, b: Recorded) -> str | None:
    if a.secret == b.secret:
        return None
    if a.secret is None:
        return f"{SECRET_NOTE}: now recorded by keyed hash only"
    if b.secret is None:
        return "no longer secret: its content is recorded from now on"
    return SECRET_NOTE


def _large_change(a: Recorded, b: Recorded) -> str:
    if a.stored not in _LARGE or a.ends_sha256 is None:
        return LARGE_NOTE
    if b.stored not in _LARGE:
        return "no longer a large file: its content is recorded from now on"
    what = []
    if a.size != b.size:
        what.append(f"size {a.size} -> {b.size}")
    if a.mtime != b.mtime:
        what.append("mtime changed")
    if a.ends_sha256 != b.ends_sha256:
        what.append("first or last 64 KiB changed")
    return "large file: " + ", ".join(what or ["changed"])


def _content_change(a: Recorded, b: Recorded) -> str | None:
    """None when the content is the same, else a note (never content) for the message."""
    if a.stored in _LARGE or b.stored in _LARGE:
        same = (a.stored, a.ends_sha256, a.size, a.mtime) == (b.stored, b.ends_sha256, b.size, b.mtime)
        return None if same else _large_change(a, b)
    if a.sha256 == b.sha256 and a.target == b.target and a.stored == b.stored:
        return None
    if b.stored == "unreadable":
        return "could not be read: content unknown"
    if a.stored == "unreadable":
        return "readable again"
    if b.stored == "hash-only":
        return "a name git cannot store: recorded by sha256 only"
    return f"-> {display_path(b.target or '')}" if b.kind == "link" else ""


def _new_note(b: Recorded | None) -> str:
    if b is None or b.kind != "file":
        return ""
    return {
        "secret": SECRET_NOTE,
        "large": LARGE_NOTE,
        "unreadable": "could not be read: content unknown",
        "hash-only": "a name git cannot store: recorded by sha256 only",
    }.get(b.stored, "")


def diff_meta(host: str, old: Mapping[str, Recorded], new: Mapping[str, Recorded]) -> ChangeSet:
    out: list[Change] = []
    for p in sorted(set(old) | set(new)):
        a, b = old.get(p), new.get(p)
        if a is None:
            out.append(Change(p, "new", _new_note(b)))
        elif b is None:
            out.append(Change(p, "removed"))
        elif a.kind != b.kind:
            out.append(Change(p, "type", f"{a.kind} -> {b.kind}"))
        else:
            if b.secret is not None or a.secret is not None:
                note = _secret_change(a, b)
                if note is not None:
                    out.append(Change(p, "secret-changed", note))
            else:
                note = _content_change(a, b)
                if note is not None:
                    out.append(Change(p, "changed", note))
            meta = []
            if a.mode != b.mode:
                meta.append(f"mode {a.mode:04o} -> {b.mode:04o}")
            if a.owner != b.owner:
                meta.append(f"owner {display_path(a.owner)} -> {display_path(b.owner)}")
            if a.group != b.group:
                meta.append(f"group {display_path(a.group)} -> {display_path(b.group)}")
            if meta:
                out.append(Change(p, "meta", ", ".join(meta)))
    return ChangeSet(host, tuple(out))


def _is_dotgit_alias(component: str) -> bool:
    """git's own tree-path checks (verify_path: ``.git`` in any case; core.protectNTFS, on by
    default: ``.git`` or ``git~1`` followed only by spaces or dots, or a ``:`` stream)."""
    for part in component.split("\\"):  # NTFS reads a backslash as a separator
        name = part.split(":", 1)[0].rstrip(" .").lower()
        if name in (".git", "git~1"):
            return True
    return False


def git_storable(path: str, kind: str) -> bool:
    """False for a path git refuses (silently: "Ignoring path") in a tree; such a path is
    recorded in the metadata only. Stricter than git where in doubt."""
    parts = path.lstrip("/").split("/")
    if any(p in ("", ".", "..") or _is_dotgit_alias(p) for p in parts):
        return False
    if kind == "link":  # a symlinked .gitmodules (or its NTFS short name) is refused
        last = parts[-1].rstrip(" .").lower()
        if last.startswith(".gitmodules") or last.startswith("gitmod~"):
            return False
    return True


def commit_subject(changes: ChangeSet, roots: Sequence[str], in_line: frozenset[str] = frozenset()) -> str:
    """The commit's first line (and the mail subject); ``in_line``: paths that changed to what
    the fleet wants (applied or enforced), which are not drift and not counted."""

    def n(paths: Sequence[str]) -> int:
        return sum(1 for p in paths if p not in in_line)

    return (
        f"{changes.host}: {n(changes.changed)} changed, {n(changes.new)} new, "
        f"{n(changes.removed)} removed in {', '.join(roots)}"
    )
