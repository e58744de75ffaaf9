"""Drift classification and commit messages (pure)."""

from __future__ import annotations

import hashlib
from types import MappingProxyType

from reconciler.drift.history import Change, ChangeSet
from reconciler.drift.scan import HostDrift, classify_managed, commit_message, trailer
from reconciler.drift.snapshot import Entry, PathPolicy, Snapshot
from reconciler.fleet.model import DriftMode
from reconciler.kinds.resources import Desired, Domain, FileResource, LinkResource

POLICY = PathPolicy(roots=("/etc",))


def entry(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, "file", mode, "root", "root", len(data), 0.0, hashlib.sha256(data).hexdigest())


def test_classify_managed() -> None:
    desired = Desired(
        host="web1",
        files=(
            FileResource("/etc/a.conf", b"a\n", Domain.FILES),
            FileResource("/etc/b.conf", b"b\n", Domain.FILES, mode=0o600),
            FileResource("/etc/missing.conf", b"m\n", Domain.FILES),
            FileResource("/srv/outside", b"x\n", Domain.FILES),
        ),
        links=(LinkResource("/etc/l", "/etc/a.conf", Domain.FILES),),
    )
    snap = Snapshot(
        "web1",
        ("/etc",),
        MappingProxyType(
            {
                "/etc/a.conf": entry("/etc/a.conf", b"a\n"),
                "/etc/b.conf": entry("/etc/b.conf", b"B\n", 0o644),
                "/etc/l": Entry("/etc/l", "link", 0o777, "root", "root", target="/etc/other"),
            }
        ),
    )
    got = classify_managed(desired, snap, POLICY)
    assert got["/etc/a.conf"] is None
    assert got["/etc/b.conf"] == "content differs from the fleet; mode 0644 (fleet 0600)"
    assert got["/etc/missing.conf"] == "missing"
    assert got["/etc/l"] == "points to /etc/other, the fleet says /etc/a.conf"
    assert "/srv/outside" not in got


def test_commit_message_marks_drift_and_not_drift() -> None:
    ch = ChangeSet(
        "web1",
        (
            Change("/etc/a.conf", "changed"),
            Change("/etc/b.conf", "changed"),
            Change("/etc/new", "new"),
            Change("/etc/shadow", "secret-changed"),
        ),
    )
    managed = {"/etc/a.conf": None, "/etc/b.conf": "content differs from the fleet"}
    msg, drift = commit_message(
        ch, ("/etc",), managed, mode=DriftMode.ENFORCE, fleet_commit="abc", baseline=False, entries=10
    )
    # a.conf is back in line with the fleet: recorded, but neither counted nor listed as drift
    assert msg.splitlines()[0] == "web1: 2 changed, 1 new, 0 removed in /etc"
    assert drift == ("/etc/b.conf", "/etc/new", "/etc/shadow")
    assert "Changed:\n  /etc/b.conf" in msg and "Changed:\n  /etc/a.conf" not in msg
    assert "  /etc/shadow (secret (content hidden))" in msg
    assert "Managed by the fleet and now different from it (drift mode enforce):" in msg
    assert "  /etc/b.conf: content differs from the fleet" in msg
    assert "Now as the fleet wants them (not drift):\n  /etc/a.conf" in msg
    assert trailer(msg, "Drift") == "yes" and trailer(msg, "Fleet-Commit") == "abc"
    only_back, drift = commit_message(
        ChangeSet("web1", (Change("/etc/a.conf", "changed"),)), ("/etc",), managed,
        mode=DriftMode.ENFORCE, fleet_commit=None, baseline=False, entries=10,
    )  # fmt: skip
    assert drift == () and trailer(only_back, "Drift") == "no"
    base, drift = commit_message(
        ch, ("/etc",), {}, mode=DriftMode.REPORT, fleet_commit=None, baseline=True, entries=10
    )
    assert base.startswith("web1: initial snapshot of /etc (10 paths)") and drift == ()
    assert trailer(base, "Drift") == "no"


def test_names_and_notes_in_the_message_are_one_line_each() -> None:
    bad = b"/etc/x\xff\nDrift: no".decode("utf-8", "surrogateescape")
    ch = ChangeSet("web1", (Change(bad, "new"),))
    notes = tuple(f"/etc/f{i} could not be read: recorded as unreadable" for i in range(60))
    msg, drift = commit_message(
        ch, ("/etc",), {}, mode=DriftMode.REPORT, fleet_commit=None, baseline=False, entries=1, notes=notes
    )
    assert "  /etc/x\\xff\\nDrift: no\n" in msg and drift == (bad,)
    assert [ln for ln in msg.splitlines() if ln.startswith("Drift:")] == ["Drift: yes"]
    assert "  /etc/f49 could not be read" in msg and "/etc/f50 " not in msg and "... and 10 more" in msg
    msg.encode("utf-8")  # no raw surrogate left
    shown = HostDrift("web1", new=(bad,), drift=(bad,)).as_dict()
    assert shown["new"] == ["/etc/x\\xff\\nDrift: no"] and shown["drift"] == shown["new"]


def test_the_engines_own_writes_are_in_line() -> None:
    """The firewall's persistent rules and the key pair the apply made are the fleet's, not drift
    (they were counted as hand edits after every first converge); a changed ruleset is drift."""
    from reconciler.kinds.resources import FirewallRuleset, KeyPair

    rules = "*filter\n:INPUT DROP [0:0]\nCOMMIT\n"
    desired = Desired(
        host="web1",
        firewall=FirewallRuleset(rules_v4=rules, rules_v6=rules),
        keypairs=(KeyPair("strongswan", "/etc/swanctl/private/k.pem", "/etc/swanctl/pubkey/self.pub", ()),),
    )
    entries = {
        "/etc/iptables/rules.v4": entry("/etc/iptables/rules.v4", rules.encode()),
        "/etc/iptables/rules.v6": entry("/etc/iptables/rules.v6", b"*filter\nCOMMIT\n"),
        "/etc/swanctl/private/k.pem": entry("/etc/swanctl/private/k.pem", b"secret", 0o600),
    }
    got = classify_managed(desired, Snapshot("web1", ("/etc",), MappingProxyType(entries)), POLICY)
    assert got["/etc/iptables/rules.v4"] is None and got["/etc/swanctl/private/k.pem"] is None
    assert got["/etc/iptables/rules.v6"] == "differs from the fleet's firewall"
    assert got["/etc/swanctl/pubkey/self.pub"] == "missing (the key pair is made on the host)"


def test_the_directories_the_engine_made_are_in_line() -> None:
    conf = FileResource("/etc/strongswan.d/reconciler/a.conf", b"a\n", Domain.FILES)
    desired = Desired(host="web1", files=(conf,), owned_dirs=("/etc/apache2/reconciler",))
    dirs = ("/etc/strongswan.d", "/etc/strongswan.d/reconciler", "/etc/reconciler", "/etc/apache2/reconciler")
    d = {p: Entry(p, "dir", 0o755, "root", "root") for p in dirs}
    got = classify_managed(desired, Snapshot("web1", ("/etc",), MappingProxyType(d)), POLICY)
    assert got["/etc/strongswan.d/reconciler"] is None and got["/etc/strongswan.d"] is None
    assert got["/etc/reconciler"] is None and got["/etc/apache2/reconciler"] is None
    assert "/etc" not in got


def test_what_the_fleet_removes_is_in_line_once_gone() -> None:
    """Debian's global deflate.conf and default site, removed by the apply when sites own their
    defaults, were counted as hand edits ("2 removed", drift) after the first converge."""
    from reconciler.kinds.resources import Absent

    gone = Absent("/etc/apache2/mods-enabled/deflate.conf", Domain.APACHE, "sites own compression")
    back = Absent("/etc/apache2/sites-enabled/000-default.conf", Domain.APACHE, "sites own the defaults")
    desired = Desired(host="web1", absent=(gone, back))
    entries = {back.path: Entry(back.path, "link", 0o777, "root", "root", target="../sites-available/x")}
    got = classify_managed(desired, Snapshot("web1", ("/etc",), MappingProxyType(entries)), POLICY)
    assert got[gone.path] is None
    assert got[back.path] == "exists (sites own the defaults: the fleet removes it)"
