"""AppArmor denials from kernel logs -> the exact profile rules that would fix them.

Pure parts: ``parse_denial`` (old ``type=1503 operation=... requested_mask="w::"`` lines and
current ``apparmor="DENIED" operation=...`` lines, audit.log hex-encoded names too) and
``suggest`` (denials -> rules grouped per profile, for the profile's local override file
``/etc/apparmor.d/local/<profile file>``).

Remote part: ``read_kernel_log`` reads the lines added since a per-host cursor in ONE round trip:
every existing file among /var/log/kern.log, /var/log/audit/audit.log, /var/log/syslog (byte
offset + inode per file, so rotation to ``<file>.1`` and truncation are handled); if none
exists, the journal (``journalctl -k --after-cursor``), else ``dmesg``. The same denial seen in
two sources is one denial (``Denial.key``). A host seen for the first time starts at the end of
its logs (history before the reconciler came is not mailed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.drift.snapshot import SnapshotError
from reconciler.host.script import Runner, prelude, run_framed, said
from reconciler.log import get_logger

log = get_logger(__name__)

LOG_FILES: tuple[tuple[str, str], ...] = (
    ("kern", "/var/log/kern.log"),
    ("audit", "/var/log/audit/audit.log"),
    ("syslog", "/var/log/syslog"),
)
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
LOCAL_DIR = "/etc/apparmor.d/local"

# ---------------------------------------------------------------- parsing

_KV = re.compile(r'([a-z_0-9]+)=("(?:[^"\\]|\\.)*"|[^\s]+)')
_HEX = re.compile(r"^(?:[0-9A-F]{2})+$")
_HEX_KEYS = frozenset({"name", "name2", "profile", "comm", "target", "peer", "exe"})
_DIR_OPS = frozenset({"mkdir", "rmdir"})
_CREATE_OPS = frozenset({"mknod"})
_PROC_PID = re.compile(r"^/proc/\d+/")


@dataclass(frozen=True)
class Denial:
    profile: str
    operation: str
    name: str = ""  # the path (file operations)
    requested: str = ""
    denied: str = ""
    capability: str = ""  # capname for operation="capable"
    family: str = ""  # network denials
    sock_type: str = ""
    comm: str = ""
    line: str = ""

    @property
    def key(self) -> str:
        """Stable identity: the same denial repeated (or seen in two logs) has one key."""
        ident = "\0".join(
            (
                self.profile,
                self.operation,
                self.name,
                self.denied,
                self.capability,
                self.family,
                self.sock_type,
            )
        )
        return "denial:" + hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _fields(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _KV.findall(line):
        if v.startswith('"'):
            v = v[1:-1].replace('\\"', '"')
        elif k in _HEX_KEYS and _HEX.match(v):
            try:
                v = bytes.fromhex(v).decode("utf-8", "surrogateescape")
            except ValueError:
                pass
        out.setdefault(k, v)
    return out


def parse_denial(line: str) -> Denial | None:
    """One log line -> a Denial, or None if it is not an AppArmor denial."""
    if "apparmor" not in line and "type=1503" not in line and "type=APPARMOR_DENIED" not in line:
        return None
    f = _fields(line)
    verdict = f.get("apparmor", "")
    old_style = f.get("type") in ("1503", "APPARMOR_DENIED") and not verdict
    if verdict != "DENIED" and not old_style:
        return None
    profile = f.get("profile", "")
    operation = f.get("operation", "")
    if not profile or not operation:
        return None
    return Denial(
        profile=profile,
        operation=operation,
        name=f.get("name", ""),
        requested=f.get("requested_mask", ""),
        denied=f.get("denied_mask", f.get("requested_mask", "")),
        capability=f.get("capname", ""),
        family=f.get("family", ""),
        sock_type=f.get("sock_type", ""),
        comm=f.get("comm", ""),
        line=line.strip(),
    )


def parse_lines(lines: Iterable[str]) -> list[Denial]:
    """Every denial in ``lines``, each key once, in first-seen order."""
    seen: dict[str, Denial] = {}
    for line in lines:
        d = parse_denial(line)
        if d is not None:
            seen.setdefault(d.key, d)
    return list(seen.values())


# ---------------------------------------------------------------- suggestions

_ORDER = "rwalkm"


def rule_perms(mask: str) -> str:
    """A kernel mask ("w::", "::rw", "rc", "x") -> AppArmor rule permissions ("w", "rw", "ix").

    create (c), delete (d) and write (w) all need ``w``; append alone needs ``a``; read ``r``,
    lock ``k``, link ``l``, mmap-exec ``m``; exec ``x`` becomes ``ix`` (inherit the profile)."""
    letters = set(mask.replace(":", ""))
    perms = set()
    for ch in letters:
        if ch in "wcd":
            perms.add("w")
        elif ch in "rakml":
            perms.add(ch)
    if "w" in perms:
        perms.discard("a")  # w implies a
    out = "".join(c for c in _ORDER if c in perms)
    if "x" in letters:
        out += "ix"
    return out


def _merge_perms(a: str, b: str) -> str:
    x = "ix" if "ix" in a or "ix" in b else ""
    letters = set(a.replace("ix", "")) | set(b.replace("ix", ""))
    if "w" in letters:
        letters.discard("a")
    return "".join(c for c in _ORDER if c in letters) + x


def quote_path(path: str, glob_suffix: str = "") -> str:
    """A literal path (plus an optional glob such as "**") as an AppArmor rule path: glob
    characters of the literal part escaped, the whole quoted if it holds whitespace."""
    esc = re.sub(r'([*?\[\]{}^"\\])', r"\\\1", path) + glob_suffix
    return f'"{esc}"' if re.search(r"\s", esc) else esc


def profile_file(profile: str) -> str:
    """The file name of a profile: "/usr/sbin/mysqld" -> "usr.sbin.mysqld"; hats use the parent."""
    base = profile.split("//", 1)[0]
    if base.startswith("/"):
        return base.lstrip("/").replace("/", ".")
    return base


@dataclass(frozen=True)
class Suggestion:
    profile: str
    local_file: str  # /etc/apparmor.d/local/<profile file>
    rules: tuple[str, ...]
    denials: tuple[Denial, ...] = field(default=(), compare=False)

    def text(self) -> str:
        lines = [f"# {self.local_file}  (profile {self.profile})"]
        lines += [f"  {r}" for r in self.rules]
        return "\n".join(lines)


def _looks_like_dir(d: Denial) -> bool:
    """For a path that does not exist on the host: a trailing "/", mkdir/rmdir, or the old
    ``inode_create`` hook (files and directories alike) on a name without an extension."""
    if d.name.endswith("/") or d.operation in _DIR_OPS:
        return True
    return d.operation == "inode_create" and "." not in posixpath.basename(d.name)


def rules_for(d: Denial, kind: str | None = None) -> list[tuple[str, str]]:
    """(rule path or keyword, permissions) for one denial. ``kind``: "dir" or "file" as seen on
    the host, or None when the path does not exist there (see ``_looks_like_dir``)."""
    if d.operation == "capable" and d.capability:
        return [(f"capability {d.capability}", "")]
    if d.family and d.operation in ("create", "connect", "bind", "listen", "accept", "sendmsg", "recvmsg"):
        return [(f"network {d.family} {d.sock_type}".strip(), "")]
    if not d.name.startswith("/"):
        return []
    perms = rule_perms(d.denied or d.requested)
    if d.operation == "exec":
        perms = _merge_perms(perms, "ix")
    if not perms:
        return []
    proc = _PROC_PID.match(d.name)
    if proc:  # a process's own /proc entry: the PID changes at every start
        return [("@{PROC}/@{pid}/" + quote_path(d.name[proc.end() :]), perms)]
    is_dir = kind == "dir" or (kind is None and _looks_like_dir(d))
    if d.operation in _CREATE_OPS and kind != "dir":
        # a program creating a file (mknod: the current kernels' denial) needs the directory
        # it creates files in, not that one name (lock files, logs, data files: MariaDB's first
        # denied file in a moved datadir is only the first of many)
        d = dataclasses.replace(d, name=posixpath.dirname(d.name.rstrip("/")) or "/")
        is_dir = True
    if is_dir:
        path = d.name.rstrip("/") or "/"
        rec = _merge_perms(perms, "r")
        if "w" in rec:
            rec = _merge_perms(rec, "k")  # what a service writes it reads back and locks
        slash = path.rstrip("/") + "/"
        return [(quote_path(slash), "r"), (quote_path(slash, "**"), rec)]
    return [(quote_path(d.name), perms)]


def suggest(
    denials: Sequence[Denial],
    kinds: Mapping[str, str] | None = None,
    profile_files: Mapping[str, str] | None = None,
) -> list[Suggestion]:
    """Group the rules that fix ``denials`` per profile, permissions merged, sorted.

    ``kinds``: path -> "dir"/"file" as seen on the host; ``profile_files``: profile name ->
    file name under /etc/apparmor.d when it is not derived from the name (e.g. from the fleet)."""
    kinds = kinds or {}
    per: dict[str, dict[str, str]] = {}
    why: dict[str, list[Denial]] = {}
    for d in denials:
        rules = rules_for(d, kinds.get(d.name.rstrip("/") or "/") or kinds.get(d.name))
        if not rules:
            continue
        prof = d.profile.split("//", 1)[0]
        bucket = per.setdefault(prof, {})
        why.setdefault(prof, []).append(d)
        for path, perms in rules:
            bucket[path] = _merge_perms(bucket[path], perms) if path in bucket else perms
    out = []
    for prof in sorted(per):
        fname = (profile_files or {}).get(prof) or profile_file(prof)
        texts = tuple(f"{p} {perms}," if perms else f"{p}," for p, perms in sorted(per[prof].items()))
        out.append(Suggestion(prof, posixpath.join(LOCAL_DIR, fname), texts, tuple(why[prof])))
    return out


# ---------------------------------------------------------------- reading kernel logs

# Args: $1 max bytes, $2 mode (base|read|tail), then ino/off per LOG_FILES entry, then the
# journal cursor and the dmesg timestamp ("-" = none). Framed (reconciler.host.script), raw
# bytes: said lines "C src ino start" / "R src ino start" (rotated file), each followed by its
# chunk (section "C.src" / "R.src", not in base mode), "A src" (absent), "J" (journal, section
# "J"), "D" (dmesg, section "D").
READ_SCRIPT = (
    prelude(fixed_path=False)
    + r"""
set -u
max=$1; mode=$2; shift 2
found=0
chunk() { # file start
  tail -c +$(($2 + 1)) "$1" 2>/dev/null | head -c "$max"
}
for spec in kern:/var/log/kern.log audit:/var/log/audit/audit.log syslog:/var/log/syslog; do
  src=${spec%%:*}; f=${spec#*:}; cino=$1; coff=$2; shift 2
  if [ ! -f "$f" ]; then say A "$src"; continue; fi
  found=1
  ino=$(stat -c %i "$f"); size=$(stat -c %s "$f")
  if [ "$mode" = base ]; then say C "$src" "$ino" "$size"; continue; fi
  if [ "$mode" = tail ]; then
    start=$((size > max ? size - max : 0)); say C "$src" "$ino" "$start"; frame "C.$src" chunk "$f" "$start"
    continue
  fi
  if [ "$cino" != - ] && [ "$cino" != "$ino" ]; then
    if [ -f "$f.1" ] && [ "$(stat -c %i "$f.1")" = "$cino" ]; then
      say R "$src" "$cino" "$coff"; frame "R.$src" chunk "$f.1" "$coff"
    fi
    coff=0
  fi
  [ "$cino" = - ] && coff=0
  [ "$size" -lt "$coff" ] && coff=0
  say C "$src" "$ino" "$coff"; frame "C.$src" chunk "$f" "$coff"
done
jcur=$1; dts=$2
journal() {
  if [ "$jcur" = - ] || [ "$mode" != read ]; then set -- -n 200; else set -- --after-cursor="$jcur"; fi
  journalctl -k -q --no-pager -o short-monotonic "$@" --show-cursor 2>/dev/null | tail -c "$max"
}
kmsg() { dmesg 2>/dev/null | tail -c "$max"; }
if [ $found = 0 ] && [ -d /run/systemd/system ] && command -v journalctl >/dev/null 2>&1; then
  say J; frame J journal
elif [ $found = 0 ]; then
  say D; frame D kmsg
fi
exit 0
"""
)


@dataclass(frozen=True)
class FileCursor:
    inode: str | None  # None: the file did not exist at the last read
    offset: int = 0


@dataclass(frozen=True)
class LogCursor:
    files: Mapping[str, FileCursor] = field(default_factory=dict)
    journal: str | None = None
    dmesg: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "files": {k: {"inode": v.inode, "offset": v.offset} for k, v in sorted(self.files.items())},
            "journal": self.journal,
            "dmesg": self.dmesg,
        }

    @staticmethod
    def from_json(d: Mapping[str, object]) -> LogCursor:
        files_raw = d.get("files") or {}
        assert isinstance(files_raw, dict)
        files = {
            str(k): FileCursor(None if v.get("inode") is None else str(v["inode"]), int(v.get("offset", 0)))
            for k, v in files_raw.items()
        }
        j = d.get("journal")
        dm = d.get("dmesg")
        return LogCursor(files, None if j is None else str(j), None if dm is None else float(str(dm)))


@dataclass(frozen=True)
class LogRead:
    lines: tuple[str, ...]
    cursor: LogCursor
    sources: tuple[str, ...]  # e.g. ("kern",) or ("journal",)
    baseline: bool = False


_DMESG_TS = re.compile(r"^\[\s*(\d+\.\d+)\]")
_JOURNAL_CURSOR = "-- cursor: "


async def read_kernel_log(
    conn: Runner, cursor: LogCursor | None, *, max_bytes: int = DEFAULT_MAX_BYTES, tail: bool = False
) -> LogRead:
    """Lines added since ``cursor`` (None: first contact, record the end and return nothing;
    ``tail``: the last ``max_bytes`` of each log, cursor untouched). One round trip."""
    mode = "tail" if tail else ("base" if cursor is None else "read")
    args = [str(max_bytes), mode]
    cur = cursor or LogCursor()
    for src, _ in LOG_FILES:
        fc = cur.files.get(src)
        args += [fc.inode if fc and fc.inode else "-", str(fc.offset if fc else 0)]
    args += [cur.journal or "-", "-" if cur.dmesg is None else repr(cur.dmesg)]
    run = await run_framed(conn, READ_SCRIPT, args, timeout=60)
    if run.result.exit_status != 0:
        raise SnapshotError(f"host {conn.host}: reading kernel logs failed (exit {run.result.exit_status})")
    lines: list[str] = []
    files: dict[str, FileCursor] = {}
    sources: list[str] = []
    journal, dmesg = cur.journal, cur.dmesg

    def payload(sid: str) -> bytes:
        sec = run.sections.get(sid)
        return sec.body if sec is not None else b""

    def complete(data: bytes) -> tuple[list[str], int]:
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) >= max_bytes:  # one giant line: skip it
            end = len(data)
        text = data[:end].decode("utf-8", "replace")
        return text.splitlines(), end

    for said_line in said(run.sections):
        parts = said_line.split(" ")
        tag = parts[0]
        if tag == "A" and len(parts) == 2:
            files[parts[1]] = FileCursor(None, 0)
        elif tag in ("C", "R") and len(parts) == 4:
            src, ino, start = parts[1], parts[2], int(parts[3])
            if mode == "base":
                files[src] = FileCursor(ino, start)
                continue
            got, used = complete(payload(f"{tag}.{src}"))
            lines += got
            sources.append(src)
            if tag == "C":
                files[src] = FileCursor(ino, start + used)
        elif tag == "J":
            for ln in payload("J").decode("utf-8", "replace").splitlines():
                if ln.startswith(_JOURNAL_CURSOR):
                    journal = ln[len(_JOURNAL_CURSOR) :].strip()
                elif mode != "base" and (cur.journal is not None or tail):
                    lines.append(ln)
            sources.append("journal")
        elif tag == "D":
            last = dmesg
            for ln in payload("D").decode("utf-8", "replace").splitlines():
                m = _DMESG_TS.match(ln)
                ts = float(m.group(1)) if m else None
                if mode == "read" and (cur.dmesg is None or (ts is not None and ts > cur.dmesg)):
                    lines.append(ln)
                elif tail:
                    lines.append(ln)
                if ts is not None and (last is None or ts > last):
                    last = ts
            dmesg = last
            sources.append("dmesg")
    new_cursor = cur if tail else LogCursor(files, journal, dmesg)
    return LogRead(tuple(lines), new_cursor, tuple(sources), baseline=mode == "base")


KIND_SCRIPT = (
    prelude(fixed_path=False)
    + r"""
kinds() { for p do if [ -d "$p" ]; then echo d; elif [ -e "$p" ]; then echo f; else echo -; fi; done; }
frame kinds kinds "$@"
"""
)


async def path_kinds(conn: Runner, paths: Sequence[str]) -> dict[str, str]:
    """ "dir"/"file" for each path that exists on the host (one round trip)."""
    uniq = sorted({p.rstrip("/") or "/" for p in paths if p.startswith("/")})
    if not uniq:
        return {}
    run = await run_framed(conn, KIND_SCRIPT, uniq, timeout=30)
    sec = run.sections.get("kinds")
    kinds: dict[str, str] = {}
    for p, k in zip(uniq, sec.text.split() if sec is not None else (), strict=False):
        if k in ("d", "f"):
            kinds[p] = "dir" if k == "d" else "file"
    return kinds


async def denial_suggestions(
    conn: Runner, *, max_bytes: int = 1024 * 1024, profile_files: Mapping[str, str] | None = None
) -> list[Suggestion]:
    """For ``reconciler plan``: suggestions from the recent tail of the host's kernel logs.
    Read-only: no cursor moves, nothing is mailed."""
    read = await read_kernel_log(conn, None, max_bytes=max_bytes, tail=True)
    denials = parse_lines(read.lines)
    if not denials:
        return []
    kinds = await path_kinds(conn, [d.name for d in denials if d.name])
    return suggest(denials, kinds, profile_files)


# ---------------------------------------------------------------- cursor store


class CursorStore:
    """Per-host kernel log cursors as JSON files in ``<state_dir>/kernlog/`` (atomic writes)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir) / "kernlog"

    def load(self, host: str) -> LogCursor | None:
        try:
            return LogCursor.from_json(json.loads((self.dir / f"{host}.json").read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AssertionError, AttributeError):
            log.warning("kernel log cursor unreadable; starting again at the end", host=host)
            return None

    def save(self, host: str, cursor: LogCursor) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{host}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(cursor.to_json(), f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / f"{host}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
