"""The SQLite state store: host status, rejected commits, events; durable across restarts."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from reconciler.daemon.store import INTERRUPTED_REASON, MAX_TEXT, HostState, Store


def test_wal_mode_and_private_dir(tmp_path: Path) -> None:
    s = Store(tmp_path / "state" / "state.db")
    assert s.journal_mode() == "wal"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    s.close()


def test_host_lifecycle(tmp_path: Path) -> None:
    clock = iter(range(100, 200))
    s = Store(tmp_path / "state.db", clock=lambda: float(next(clock)))
    assert s.host("db1").state is HostState.UNKNOWN
    s.mark_reconciling("db1", "c1")
    st = s.host("db1")
    assert st.state is HostState.RECONCILING and st.attempted_commit == "c1" and st.applied_commit == ""
    s.mark_ready("db1", "c1", "applied 3 change(s)")
    s.mark_reconciling("db1", "c2")
    s.mark_stalled("db1", "c2", "apache2ctl -t failed")
    st = s.host("db1")
    assert st.state is HostState.STALLED and st.reason == "apache2ctl -t failed"
    assert st.applied_commit == "c1" and st.attempted_commit == "c2"  # both kept
    s.mark_observed("db1", "c3", "plan mode: 2 change(s) pending")
    st = s.host("db1")
    assert st.state is HostState.READY and st.applied_commit == "c1" and st.attempted_commit == "c3"
    s.close()


def test_drift_is_counted(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    s.mark_ready("web1", "c1")
    s.record_drift("web1", 2, at=1000.0)
    s.record_drift("web1", 1, at=2000.0)
    st = s.host("web1")
    assert st.drift_count == 3 and st.last_drift_at == 2000.0 and st.state is HostState.READY
    s.record_drift("new", 1)
    assert s.host("new").drift_count == 1
    s.close()


def test_rejected_commit_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = Store(path)
    assert s.reject_commit("abc", "unsigned: commit abc is not signed")
    assert not s.reject_commit("abc", "unsigned: again")
    s.close()
    s2 = Store(path)  # a restart remembers it: no second mail
    assert not s2.reject_commit("abc", "unsigned")
    assert s2.rejected_reason("abc") == "unsigned: commit abc is not signed"
    assert s2.rejected_reason("def") is None
    s2.close()


def test_events_newest_first_and_filtered(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    s.add_event("commit", "new good commit", commit="c1")
    s.add_event("drift", "2 paths", host="web1")
    s.add_event("failed", "x" * (MAX_TEXT + 100), host="db1")
    events = s.events()
    assert [e.kind for e in events] == ["failed", "drift", "commit"]
    assert len(events[0].message) == MAX_TEXT
    assert [e.kind for e in s.events(host="web1")] == ["drift"]
    assert [e.kind for e in s.events(kinds=("commit", "drift"))] == ["drift", "commit"]
    s.close()


def test_hosts_that_left_the_fleet_are_shown_until_forgotten(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    for h in ("a", "b", "c"):
        s.mark_ready(h, "c1")
    assert s.mark_removed_except({"a", "c"}, "c2" * 20) == ["b"]
    assert s.mark_removed_except({"a", "c"}, "c3" * 20) == []  # already Removed: commit kept
    b = s.host("b")
    assert b.state is HostState.REMOVED and b.removed_commit == "c2" * 20
    assert "removed from the fleet" in b.reason
    assert b.applied_commit == "c1"  # what it last ran is still shown
    # only a Removed host can be forgotten; a host still in the fleet or unknown is refused
    assert s.forget_removed(["a", "b", "zz"]) == (["b"], ["a", "zz"])
    assert [h.name for h in s.hosts()] == ["a", "c"]
    # a removed host that comes back is reconciled as usual
    s.mark_removed_except({"a"}, "c4" * 20)
    s.mark_reconciling("c", "c5")
    assert s.host("c").state is HostState.RECONCILING and s.host("c").removed_commit == ""
    s.close()


def test_meta_and_json(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    assert s.get_meta("source.good") == ""
    s.set_meta("source.good", "c1")
    s.set_meta("source.good", "c2")
    s.set_json("x", {"a": [1, 2]})
    assert s.get_meta("source.good") == "c2" and s.get_json("x") == {"a": [1, 2]}
    s.close()


def test_survives_sigkill_mid_reconcile(tmp_path: Path) -> None:
    """A process killed while a host is Reconciling: committed rows stay, the host is Stalled."""
    path = tmp_path / "state.db"
    code = textwrap.dedent(
        f"""
        import os, signal
        from reconciler.daemon.store import Store
        s = Store({str(path)!r})
        s.mark_ready("db1", "c1")
        s.mark_reconciling("db1", "c2")
        s.add_event("commit", "new good commit", commit="c2")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=30)
    assert proc.returncode == -9
    s = Store(path)
    assert s.interrupted_hosts == ("db1",)
    st = s.host("db1")
    assert st.state is HostState.RETRYING and st.reason == INTERRUPTED_REASON
    assert st.applied_commit == "c1" and st.attempted_commit == "c2"
    assert s.events()[0].commit == "c2"
    s.close()
    # The database is intact.
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_state_file_of_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema_version', '1');"
            "CREATE TABLE hosts (name TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',"
            " applied_commit TEXT NOT NULL DEFAULT '', attempted_commit TEXT NOT NULL DEFAULT '',"
            " last_drift_at REAL, drift_count INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL);"
            "INSERT INTO hosts(name, state, reason, applied_commit, attempted_commit, updated_at)"
            " VALUES ('web1', 'Stalled', 'host key refused', 'c1', 'c2', 1.0);"
        )
    s = Store(path)
    st = s.host("web1")
    assert st.state is HostState.STALLED and st.code == "" and st.applied_commit == "c1"
    s.mark_stalled("web1", "c3", "x", code="validation-failed")
    assert s.host("web1").code == "validation-failed"
    assert s.get_meta("schema_version") == "2"
    s.close()
