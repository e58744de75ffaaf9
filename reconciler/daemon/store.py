"""SQLite state of the daemon: per-host status, source state, an events log.

One file (``<state_dir>/state.db``) in WAL mode with ``synchronous=FULL``: every write is one
short transaction, so a crash or SIGKILL leaves the last committed state, and a restart resumes
from it. The daemon uses one ``Store`` from the event loop's thread; each call takes
milliseconds. Nothing secret is ever written here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

# What the store keeps as JSON (status records, meta values): what json.loads returns.
JsonValue: TypeAlias = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject: TypeAlias = dict[str, JsonValue]

SCHEMA_VERSION = 2  # 2: hosts.code (the typed failure reason), hosts.removed_commit
MAX_EVENTS = 5000  # the events log keeps this many rows
MAX_TEXT = 4000
INTERRUPTED_REASON = "interrupted by a restart; will reconcile again"  # longer reasons/messages are cut


class HostState(StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"  # a terminal failure: nothing more is tried until a new commit or a sync
    RETRYING = "Retrying"  # a transient failure: retried with backoff
    REMOVED = "Removed"  # left the fleet; shown until acknowledged (``reconciler sync --forget``)
    UNKNOWN = "Unknown"  # never reconciled yet


@dataclass(frozen=True)
class HostStatus:
    name: str
    state: HostState
    reason: str
    applied_commit: str  # the last commit fully applied ("" = none yet)
    attempted_commit: str  # the last commit a reconcile was attempted for
    last_drift_at: float | None  # unix time of the last drift found
    drift_count: int  # drift findings seen in total
    updated_at: float
    code: str = ""  # the typed reason (reconciler.errors.Reason) of a Stalled/Retrying host
    removed_commit: str = ""  # the commit whose fleet no longer had the host (state Removed)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "code": self.code,
            "removed_commit": self.removed_commit,
            "applied_commit": self.applied_commit,
            "attempted_commit": self.attempted_commit,
            "last_drift_at": self.last_drift_at,
            "drift_count": self.drift_count,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str  # e.g. "reconciled", "failed", "drift", "commit-rejected", "fetch-failed"
    host: str  # "" for fleet-wide events
    commit: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "host": self.host,
            "commit": self.commit,
            "message": self.message,
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    applied_commit TEXT NOT NULL DEFAULT '',
    attempted_commit TEXT NOT NULL DEFAULT '',
    last_drift_at REAL,
    drift_count INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    code TEXT NOT NULL DEFAULT '',
    removed_commit TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    commit_id TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_host ON events(host, id);
CREATE TABLE IF NOT EXISTS host_records (
    host TEXT NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (host, kind)
);
CREATE TABLE IF NOT EXISTS rejected_commits (
    commit_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


class Store:
    """Durable daemon state. ``Store(path)`` creates or opens the database."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._clock = clock
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._interrupted = self._mark_interrupted()

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def journal_mode(self) -> str:
        row = self._db.execute("PRAGMA journal_mode").fetchone()
        return str(row[0])

    def _migrate(self) -> None:
        """Schema 1 -> 2: add the columns a state file of an older daemon lacks."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(hosts)")}
        with self._tx() as db:
            for column in ("code", "removed_commit"):
                if column not in have:
                    db.execute(f"ALTER TABLE hosts ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def _mark_interrupted(self) -> tuple[str, ...]:
        """Hosts left ``Reconciling`` by a crash or a cancelled shutdown: say so, keep the rest."""
        rows = self._db.execute("SELECT name FROM hosts WHERE state = ?", (HostState.RECONCILING.value,))
        names = tuple(r[0] for r in rows)
        if names:
            now = self._clock()
            with self._tx() as db:
                for name in names:
                    db.execute(
                        "UPDATE hosts SET state = ?, reason = ?, code = '', updated_at = ? WHERE name = ?",
                        (
                            HostState.RETRYING.value,
                            "interrupted by a restart; will reconcile again",
                            now,
                            name,
                        ),
                    )
        return names

    @property
    def interrupted_hosts(self) -> tuple[str, ...]:
        """Hosts whose reconcile was in flight when the previous process stopped."""
        return self._interrupted

    # ------------------------------------------------------------ key/value

    def get_meta(self, key: str, default: str = "") -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_json(self, key: str) -> JsonValue:
        raw = self.get_meta(key)
        return json.loads(raw) if raw else None

    def set_json(self, key: str, value: JsonValue) -> None:
        self.set_meta(key, json.dumps(value, sort_keys=True))

    # ------------------------------------------------------------ hosts

    def host(self, name: str) -> HostStatus:
        row = self._db.execute(
            "SELECT name, state, reason, applied_commit, attempted_commit, last_drift_at, drift_count,"
            " updated_at, code, removed_commit FROM hosts WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return HostStatus(name, HostState.UNKNOWN, "", "", "", None, 0, 0.0)
        return _host_row(row)

    def hosts(self) -> list[HostStatus]:
        rows = self._db.execute(
            "SELECT name, state, reason, applied_commit, attempted_commit, last_drift_at, drift_count,"
            " updated_at, code, removed_commit FROM hosts ORDER BY name"
        ).fetchall()
        return [_host_row(r) for r in rows]

    def _upsert(self, name: str, **values: Any) -> None:
        now = self._clock()
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values)
        with self._tx() as db:
            db.execute(
                f"INSERT INTO hosts(name, {cols}, updated_at) VALUES (?, {marks}, ?)"  # noqa: S608 (our columns)
                f" ON CONFLICT(name) DO UPDATE SET {updates}, updated_at = excluded.updated_at",
                (name, *values.values(), now),
            )

    def mark_reconciling(self, name: str, commit: str) -> None:
        self._upsert(
            name,
            state=HostState.RECONCILING.value,
            reason="",
            code="",
            removed_commit="",
            attempted_commit=commit,
        )

    def mark_ready(self, name: str, commit: str, reason: str = "") -> None:
        self._upsert(
            name,
            state=HostState.READY.value,
            reason=_cut(reason),
            code="",
            applied_commit=commit,
            attempted_commit=commit,
        )

    def mark_observed(self, name: str, commit: str, reason: str) -> None:
        """Observed and planned only (plan mode): Ready, the applied commit is left as it was."""
        self._upsert(name, state=HostState.READY.value, reason=_cut(reason), code="", attempted_commit=commit)

    def mark_stalled(self, name: str, commit: str, reason: str, *, code: str = "") -> None:
        """A terminal failure on ``commit``: ``code`` is its typed reason (errors.Reason)."""
        self._upsert(
            name, state=HostState.STALLED.value, reason=_cut(reason), code=str(code), attempted_commit=commit
        )

    def mark_retrying(self, name: str, commit: str, reason: str, *, code: str = "") -> None:
        """A transient failure on ``commit``, retried with backoff."""
        self._upsert(
            name, state=HostState.RETRYING.value, reason=_cut(reason), code=str(code), attempted_commit=commit
        )

    def record_drift(self, name: str, count: int, at: float | None = None) -> None:
        when = self._clock() if at is None else at
        with self._tx() as db:
            db.execute(
                "INSERT INTO hosts(name, state, last_drift_at, drift_count, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET last_drift_at = excluded.last_drift_at,"
                " drift_count = hosts.drift_count + excluded.drift_count",
                (name, HostState.UNKNOWN.value, when, count, when),
            )

    def mark_removed_except(self, names: set[str], commit: str) -> list[str]:
        """Hosts with a status row that are not in ``names`` (the fleet at ``commit``) become
        Removed: shown until acknowledged (``forget``), never silently dropped. Returns the
        hosts newly marked (those already Removed keep the commit that removed them)."""
        gone = [h.name for h in self.hosts() if h.name not in names and h.state is not HostState.REMOVED]
        if gone:
            reason = (
                f"removed from the fleet at commit {commit[:12]}; acknowledge with reconciler sync --forget"
            )
            now = self._clock()
            with self._tx() as db:
                db.executemany(
                    "UPDATE hosts SET state = ?, reason = ?, code = '', removed_commit = ?, updated_at = ?"
                    " WHERE name = ?",
                    [(HostState.REMOVED.value, reason, commit, now, n) for n in gone],
                )
        return gone

    def forget_removed(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Acknowledge removed hosts: drop their rows. Returns (forgotten, refused): a name that
        is not Removed (still in the fleet, or unknown) is refused, never dropped."""
        removed = {h.name for h in self.hosts() if h.state is HostState.REMOVED}
        ok = [n for n in dict.fromkeys(names) if n in removed]
        refused = [n for n in dict.fromkeys(names) if n not in removed]
        if ok:
            with self._tx() as db:
                db.executemany(
                    "DELETE FROM hosts WHERE name = ? AND state = ?",
                    [(n, HostState.REMOVED.value) for n in ok],
                )
        return ok, refused

    # ------------------------------------------------------------ what the status page shows

    def set_record(self, host: str, kind: str, data: JsonValue) -> None:
        """The last ``kind`` record of a host (``plan``, ``verify``...): JSON, replaced whole.
        Callers keep it small and free of secrets (no file contents but the plan's diffs, which
        the engine already masks for secret files)."""
        text = json.dumps(data, sort_keys=True, default=str)
        with self._tx() as db:
            db.execute(
                "INSERT INTO host_records(host, kind, at, data) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(host, kind) DO UPDATE SET at = excluded.at, data = excluded.data",
                (host, kind, self._clock(), text),
            )

    def record(self, host: str, kind: str) -> tuple[float, JsonValue] | None:
        row = self._db.execute(
            "SELECT at, data FROM host_records WHERE host = ? AND kind = ?", (host, kind)
        ).fetchone()
        return (float(row[0]), json.loads(row[1])) if row else None

    def rejected_commits(self, limit: int = 50) -> list[tuple[str, str, float]]:
        """(commit, reason, at) of refused commits, newest first."""
        rows = self._db.execute(
            "SELECT commit_id, reason, at FROM rejected_commits ORDER BY at DESC LIMIT ?", (limit,)
        )
        return [(str(c), str(r), float(a)) for c, r, a in rows]

    # ------------------------------------------------------------ source

    def reject_commit(self, commit: str, reason: str) -> bool:
        """Remember a commit that must never be applied; True if it was new."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO rejected_commits(commit_id, reason, at) VALUES (?, ?, ?)",
                (commit, _cut(reason), self._clock()),
            )
            return cur.rowcount == 1

    def rejected_reason(self, commit: str) -> str | None:
        row = self._db.execute(
            "SELECT reason FROM rejected_commits WHERE commit_id = ?", (commit,)
        ).fetchone()
        return str(row[0]) if row else None

    # ------------------------------------------------------------ events

    def add_event(self, kind: str, message: str, *, host: str = "", commit: str = "") -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO events(at, kind, host, commit_id, message) VALUES (?, ?, ?, ?, ?)",
                (self._clock(), kind, host, commit, _cut(message)),
            )
            event_id = int(cur.lastrowid or 0)
            if event_id % 100 == 0:
                db.execute("DELETE FROM events WHERE id <= ?", (event_id - MAX_EVENTS,))
        return event_id

    def events(self, *, limit: int = 50, host: str | None = None, kinds: tuple[str, ...] = ()) -> list[Event]:
        sql = "SELECT id, at, kind, host, commit_id, message FROM events"
        where: list[str] = []
        params: list[Any] = []
        if host is not None:
            where.append("host = ?")
            params.append(host)
        if kinds:
            where.append("kind IN (" + ", ".join("?" for _ in kinds) + ")")
            params.extend(kinds)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [Event(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) for r in self._db.execute(sql, params)]


def _host_row(row: tuple[Any, ...]) -> HostStatus:
    return HostStatus(
        name=row[0],
        state=HostState(row[1]),
        reason=row[2],
        applied_commit=row[3],
        attempted_commit=row[4],
        last_drift_at=row[5],
        drift_count=int(row[6]),
        updated_at=float(row[7]),
        code=str(row[8] or ""),
        removed_commit=str(row[9] or ""),
    )
