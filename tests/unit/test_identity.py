"""Host identity: the file format, what the observation's shell probe sees (real sh: links never
followed, odd files, wrong owners), the verdict matrix, the plan (refusal, first apply, adopt,
what is pruned), and the finish script that writes it (real sh)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.engine.finish import FINISH
from reconciler.engine.identity import (
    FORMAT,
    HostIdentity,
    IdentityFormatError,
    Seen,
    SeenIdentity,
    Verdict,
    claim_for,
    derived_fleet_id,
    fleet_id,
    format_identity,
    identity_in_line,
    judge,
    parse_identity,
    parse_section,
)
from reconciler.engine.observe import PRELUDE, build_script
from reconciler.engine.plan import plan_host
from reconciler.host.fake import FakeHost
from reconciler.host.script import ScriptBuilder, new_nonce, run_framed, said, split_sections
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.resources import Desired, Domain, FileResource

A = HostIdentity("shop-prod", "6f1c2e0a-5d7b-4c1e-9a53-2f0d8c7b1e44", "db2")
B = HostIdentity("lab-b", derived_fleet_id("lab-b"), "web1")


class _Fleet:
    def __init__(self, name: str, id: str = "") -> None:
        self.name = name
        self.id = id


# ---------------------------------------------------------------- the file


def test_format_and_parse_round_trip_and_the_file_is_plain_text() -> None:
    text = format_identity(A)
    assert parse_identity(text) == A
    lines = [ln for ln in text.decode().splitlines() if not ln.startswith("#")]
    assert lines == [f"format {FORMAT}", "fleet shop-prod", f"fleet_id {A.fleet_id}", "host db2"]
    # comments, blank lines, CRLF and a last line without newline are fine
    assert parse_identity(b"# hand note\r\n\r\n" + text.rstrip(b"\n")) == A


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "no format line"),
        (b"\xff\xfe garbage", "not UTF-8 text"),
        (format_identity(A) + b"owner root\n", "unknown key 'owner'"),
        (format_identity(A) + b"host web9\n", "host given twice"),
        (format_identity(A).replace(b"host db2\n", b""), "no host line"),
        (format_identity(A).replace(FORMAT.encode(), b"something/1"), "is not reconciler-identity/1"),
        (format_identity(A).replace(b"fleet shop-prod", b"fleet Shop Prod"), "fleet 'Shop Prod' is not"),
        (format_identity(A).replace(b"host db2", b"host ../../x"), "host '../../x' is not a valid host"),
        (
            format_identity(A).replace(A.fleet_id.encode(), b"short"),
            "fleet_id 'short' is not a valid fleet id",
        ),
        (format_identity(A).replace(b"host db2", b"host \x1b[31mred"), "\\x1b"),  # escapes stay escaped
        (b"#\n" * 64 + format_identity(A), "more than 63 lines"),
    ],
)
def test_parse_refuses_anything_it_did_not_write(data: bytes, why: str) -> None:
    with pytest.raises(IdentityFormatError) as err:
        parse_identity(data)
    assert why in str(err.value)
    assert "\x1b" not in str(err.value)


def test_a_newer_format_is_unsupported_not_garbage() -> None:
    with pytest.raises(IdentityFormatError) as err:
        parse_identity(format_identity(A).replace(FORMAT.encode(), b"reconciler-identity/2"))
    assert err.value.unsupported
    seen = parse_section(b"state file\n" + format_identity(A).replace(b"/1", b"/2"))
    assert seen.kind is Seen.UNSUPPORTED


def test_fleet_id_is_pinned_or_derived_from_the_name_only() -> None:
    assert fleet_id(_Fleet("shop", "6f1c2e0a-5d7b")) == "6f1c2e0a-5d7b"
    derived = fleet_id(_Fleet("shop"))
    assert derived == derived_fleet_id("shop") and derived.startswith("derived-") and len(derived) == 24
    assert derived == fleet_id(_Fleet("shop")) != fleet_id(_Fleet("shop2"))
    assert parse_identity(format_identity(claim_for(_Fleet("shop"), "web1"))).fleet_id == derived


def test_the_drift_scan_counts_only_this_fleets_exact_identity_as_in_line() -> None:
    fleet = _Fleet("shop", "6f1c2e0a-5d7b")
    ours = hashlib.sha256(format_identity(claim_for(fleet, "web1"))).hexdigest()
    assert identity_in_line(fleet, "web1", "file", ours)
    assert not identity_in_line(fleet, "web2", "file", ours)
    assert not identity_in_line(_Fleet("shop"), "web1", "file", ours)
    assert not identity_in_line(fleet, "web1", "link", ours)


# ---------------------------------------------------------------- the probe, with a real sh


def _probe(path: Path) -> SeenIdentity:
    b = ScriptBuilder()
    b.add(f"frame identity ident {b.ref(str(path))}")
    nonce = new_nonce()
    res = subprocess.run(
        ["sh", "-c", b.script(PRELUDE), "sh", *b.args],
        input=f"{nonce}\n".encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    sec = split_sections(res.stdout, res.stderr, nonce=nonce)["identity"]
    assert sec.exit_status == 0, res.stderr
    return parse_section(sec.body)


def test_probe_reads_a_regular_file(tmp_path: Path) -> None:
    d = tmp_path / "reconciler"
    assert _probe(d / "identity").kind is Seen.ABSENT  # no directory yet
    d.mkdir()
    assert _probe(d / "identity").kind is Seen.ABSENT
    (d / "identity").write_bytes(format_identity(A))
    assert _probe(d / "identity") == SeenIdentity(Seen.FILE, A)
    (d / "identity").write_bytes(format_identity(A).rstrip(b"\n"))  # no final newline
    assert _probe(d / "identity") == SeenIdentity(Seen.FILE, A)
    (d / "identity").write_bytes(b"hello\n")
    seen = _probe(d / "identity")
    assert seen.kind is Seen.GARBAGE and "unknown key 'hello'" in seen.detail


def test_probe_never_follows_a_symlink(tmp_path: Path) -> None:
    """An identity that is a link (even to a valid identity of this very fleet) is refused and
    its target never read; so is a linked /etc/reconciler."""
    d = tmp_path / "reconciler"
    d.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(format_identity(B))
    (d / "identity").symlink_to(elsewhere)
    assert _probe(d / "identity") == SeenIdentity(Seen.LINK)
    (d / "identity").unlink()
    (d / "identity").symlink_to(tmp_path / "nowhere")  # dangling
    assert _probe(d / "identity") == SeenIdentity(Seen.LINK)
    real = tmp_path / "real"
    real.mkdir()
    (real / "identity").write_bytes(format_identity(B))
    (tmp_path / "linked").symlink_to(real)
    assert _probe(tmp_path / "linked" / "identity") == SeenIdentity(Seen.DIR_LINK)


def test_probe_reports_odd_files_without_reading_them(tmp_path: Path) -> None:
    d = tmp_path / "reconciler"
    d.mkdir()
    (d / "identity").mkdir()
    assert _probe(d / "identity").kind is Seen.NOT_FILE
    (d / "identity").rmdir()
    os.mkfifo(d / "identity")  # a FIFO would block a reader forever
    assert _probe(d / "identity").kind is Seen.NOT_FILE
    (d / "identity").unlink()
    (tmp_path / "file").write_text("x")
    assert _probe(tmp_path / "file" / "identity").kind is Seen.DIR_NOT_DIR


def test_probe_refuses_a_file_not_owned_by_the_reconciler(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    d = tmp_path / "reconciler"
    d.mkdir()
    (d / "identity").write_bytes(format_identity(B))
    os.chown(d / "identity", 65534, 65534)  # nobody could have written a claim
    assert _probe(d / "identity").kind is Seen.NOT_OWNER
    os.chown(d / "identity", 0, 0)
    os.chown(d, 65534, 65534)
    assert _probe(d / "identity").kind is Seen.NOT_OWNER


def test_probe_reads_a_bounded_number_of_lines(tmp_path: Path) -> None:
    d = tmp_path / "reconciler"
    d.mkdir()
    (d / "identity").write_bytes(format_identity(A) + b"# padding\n" * 100_000)
    seen = _probe(d / "identity")
    assert seen.kind is Seen.GARBAGE and "more than 63 lines" in seen.detail


def test_the_identity_probe_forks_nothing(tmp_path: Path) -> None:
    """Builtins only: with an identity file present, a files-only observation still execs only
    sh, find and sha256sum."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot count the processes the script forks")
    (tmp_path / "reconciler").mkdir()
    (tmp_path / "reconciler" / "identity").write_bytes(format_identity(A))
    (tmp_path / "f").write_text("x")
    desired = Desired(host="h1", files=(FileResource(str(tmp_path / "f"), b"x", Domain.FILES),))
    script, args = build_script(
        desired, str(tmp_path / "inv.json"), str(tmp_path / "pending"), str(tmp_path / "reconciler/identity")
    )
    trace = tmp_path / "trace"
    res = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace), "sh", "-c", script, "sh", *args],
        input=f"{new_nonce()}\n".encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if res.returncode != 0 and b"ptrace" in res.stderr:
        pytest.skip(f"strace cannot trace here: {res.stderr[-200:]!r}")
    execs = [ln.split('"')[1] for ln in trace.read_text().splitlines() if "execve(" in ln and '"' in ln]
    assert sorted(os.path.basename(e) for e in execs) == ["find", "sh", "sha256sum"]
    assert b"state file" in res.stdout


# ---------------------------------------------------------------- the verdict matrix


def test_judge_matrix() -> None:
    this = HostIdentity("lab-b", "lab-b-0001", "web1")
    same = SeenIdentity(Seen.FILE, this)
    assert judge(this, same, adopt=False).verdict is Verdict.MATCH
    assert not judge(this, same, adopt=False).record
    assert judge(this, same, adopt=False).prune_inventory
    # renamed fleet (same id): still ours, the record is rewritten
    renamed = judge(
        this, SeenIdentity(Seen.FILE, HostIdentity("old-name", "lab-b-0001", "web1")), adopt=False
    )
    assert (renamed.verdict, renamed.record) == (Verdict.MATCH, True)
    first = judge(this, SeenIdentity(Seen.ABSENT), adopt=False)
    assert (first.verdict, first.record, first.prune_inventory) == (Verdict.FIRST, True, False)
    assert "first apply records it" in first.message

    other_fleet = SeenIdentity(Seen.FILE, A)
    refused = judge(this, other_fleet, adopt=False)
    assert refused.verdict is Verdict.REFUSE and not refused.record
    assert refused.message == (
        f"belongs to fleet 'shop-prod' (id {A.fleet_id}) as host 'db2'; this is fleet 'lab-b' "
        "(id lab-b-0001): refusing; use --adopt to take it over"
    )
    taken = judge(this, other_fleet, adopt=True)
    assert (taken.verdict, taken.record, taken.prune_inventory, taken.previous) == (
        Verdict.ADOPT,
        True,
        False,
        A,
    )
    other_name = judge(this, SeenIdentity(Seen.FILE, HostIdentity("lab-b", "lab-b-0001", "db9")), adopt=False)
    assert other_name.verdict is Verdict.REFUSE
    assert "is host 'db9' of this fleet 'lab-b'" in other_name.message and "not 'web1'" in other_name.message

    for kind in (Seen.GARBAGE, Seen.UNSUPPORTED, Seen.LINK):
        seen = SeenIdentity(kind, detail="why")
        assert judge(this, seen, adopt=False).verdict is Verdict.REFUSE
        assert "--adopt" in judge(this, seen, adopt=False).message
        assert judge(this, seen, adopt=True).verdict is Verdict.ADOPT
    assert "symbolic link (not followed)" in judge(this, SeenIdentity(Seen.LINK), adopt=False).message
    for kind in (Seen.NOT_FILE, Seen.DIR_LINK, Seen.DIR_NOT_DIR, Seen.NOT_OWNER):
        verdict = judge(this, SeenIdentity(kind), adopt=True)
        assert verdict.verdict is Verdict.REFUSE and "also with --adopt; fix it by hand" in verdict.message
    unread = judge(this, None, adopt=True)
    assert unread.verdict is Verdict.REFUSE and "could not be read" in unread.message


def test_a_derived_id_found_after_pinning_one_says_how_to_move_on() -> None:
    pinned = HostIdentity("shop", "shop-0001-aaaa", "web1")
    old = SeenIdentity(Seen.FILE, HostIdentity("shop", derived_fleet_id("shop"), "web1"))
    assert "before fleet.yaml pinned its id" in judge(pinned, old, adopt=False).message


# ---------------------------------------------------------------- the plan


def _desired() -> Desired:
    return Desired(
        host="web1",
        files=(FileResource("/etc/motd", b"hello\n", Domain.FILES),),
        owned_dirs=("/etc/swanctl/conf.d",),
    )


def _observed(seen: SeenIdentity | None) -> Observed:
    in_sync = FileState(
        "/etc/motd",
        True,
        sha256=hashlib.sha256(b"hello\n").hexdigest(),
        mode=0o644,
        owner="root",
        group="root",
    )
    return Observed(
        host="web1",
        files={
            "/etc/motd": in_sync,
            "/etc/apache2/sites-available/shop.conf": FileState(
                "/etc/apache2/sites-available/shop.conf", True
            ),
            "/etc/swanctl/conf.d/mesh-db9.conf": FileState("/etc/swanctl/conf.d/mesh-db9.conf", True),
        },
        inventory=("/etc/apache2/sites-available/shop.conf", "/etc/motd"),
        identity=seen,
    )


THIS = HostIdentity("lab-b", "lab-b-0001", "web1")


def test_plan_refuses_another_fleets_host_with_no_action_at_all() -> None:
    plan = plan_host(_desired(), _observed(SeenIdentity(Seen.FILE, A)), THIS)
    assert plan.actions == () and not plan.changed
    assert plan.refusal.startswith("belongs to fleet 'shop-prod'")
    assert plan.as_dict()["refusal"] == plan.refusal


def test_plan_of_a_matched_host_prunes_its_inventory() -> None:
    plan = plan_host(_desired(), _observed(SeenIdentity(Seen.FILE, THIS)), THIS)
    kinds = {(a.kind, a.path) for a in plan.actions}
    assert (ActionKind.DELETE, "/etc/apache2/sites-available/shop.conf") in kinds
    assert (ActionKind.DELETE, "/etc/swanctl/conf.d/mesh-db9.conf") in kinds
    assert not any(a.kind is ActionKind.RECORD_IDENTITY for a in plan.actions)
    in_sync = plan_host(_desired(), _observed(SeenIdentity(Seen.FILE, THIS)), THIS)
    assert in_sync.refusal == ""


@pytest.mark.parametrize(
    ("seen", "adopt", "why"),
    [
        (SeenIdentity(Seen.ABSENT), False, "no identity on the host yet"),
        (SeenIdentity(Seen.FILE, A), True, "belongs to fleet 'shop-prod'"),
    ],
)
def test_first_apply_and_adoption_never_prune_the_inventory_found(
    seen: SeenIdentity, adopt: bool, why: str
) -> None:
    """The inventory on the host is not this fleet's record: its paths are left alone and named;
    the owned directories (the mesh's conf.d: wholly this fleet's) are still pruned."""
    plan = plan_host(_desired(), _observed(seen), THIS, adopt=adopt)
    deletes = [a.path for a in plan.actions if a.kind is ActionKind.DELETE]
    assert deletes == ["/etc/swanctl/conf.d/mesh-db9.conf"]
    record = [a for a in plan.actions if a.kind is ActionKind.RECORD_IDENTITY]
    assert len(record) == 1 and why in record[0].reason and record[0].path == "/etc/reconciler/identity"
    assert plan.actions[-1].kind is ActionKind.RECORD_IDENTITY
    assert any(
        w.startswith("not pruned: 1 path(s)") and "/etc/apache2/sites-available/shop.conf" in w
        for w in plan.warnings
    )


def test_a_host_in_sync_but_without_identity_still_has_the_record_to_write() -> None:
    observed = _observed(SeenIdentity(Seen.ABSENT))
    files = {"/etc/motd": observed.files["/etc/motd"]}
    observed = Observed(
        host="web1", files=files, inventory=("/etc/motd",), identity=SeenIdentity(Seen.ABSENT)
    )
    desired = Desired(host="web1", files=_desired().files)
    plan = plan_host(desired, observed, THIS)
    assert [a.kind for a in plan.actions] == [ActionKind.RECORD_IDENTITY]
    assert plan_host(desired, observed).actions == ()  # no claim: no identity check (benchmarks)


def test_plan_without_a_readable_identity_refuses() -> None:
    plan = plan_host(_desired(), _observed(None), THIS, adopt=True)
    assert plan.actions == () and "could not be read" in plan.refusal


# ---------------------------------------------------------------- the finish script (real sh)


def _finish(tmp: Path, *, inventory: bool, identity: HostIdentity | None, helper: str = "") -> str:
    """FINISH on a fake host (real sh): the lines it said. ``helper``: perl code run as the
    path-safety helper (its output is whatever a hostile path name makes it print)."""
    inv = tmp / "var/lib/reconciler/inventory.json"
    idp = tmp / "etc/reconciler/identity"
    args = [
        str(inv) if inventory else "",
        "tok123",
        str(tmp / "var/lib/reconciler/pending-reloads"),
        str(idp) if identity else "",
        format_identity(identity).decode() if identity else "",
        "--",
        "-",
        "--",
        *(["--", helper] if helper else []),
    ]
    run = asyncio.run(run_framed(FakeHost(tmp), FINISH, args, stdin_after=b'["/etc/motd"]\n', timeout=30))
    assert run.started
    return "\n".join(said(run.sections))


def test_finish_writes_the_identity_after_the_inventory(tmp_path: Path) -> None:
    out = _finish(tmp_path, inventory=True, identity=THIS)
    assert out.splitlines() == ["INV ok", "ID ok"]
    assert json.loads((tmp_path / "var/lib/reconciler/inventory.json").read_text()) == ["/etc/motd"]
    idp = tmp_path / "etc/reconciler/identity"
    assert parse_identity(idp.read_bytes()) == THIS
    assert idp.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in idp.parent.iterdir()] == ["identity"]  # no temp left


def test_finish_replaces_a_symlinked_identity_without_touching_its_target(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("not yours\n")
    idp = tmp_path / "etc/reconciler/identity"
    idp.parent.mkdir(parents=True)
    idp.symlink_to(target)
    assert _finish(tmp_path, inventory=False, identity=THIS) == "ID ok"
    assert not idp.is_symlink() and parse_identity(idp.read_bytes()) == THIS
    assert target.read_text() == "not yours\n"


def test_finish_never_writes_the_identity_without_the_inventory(tmp_path: Path) -> None:
    """A new identity over the old inventory would let the next plan prune another fleet's paths."""
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/reconciler").write_text("a file where the directory should be\n")
    out = _finish(tmp_path, inventory=True, identity=THIS)
    assert out == "INV failed"
    assert not (tmp_path / "etc/reconciler/identity").exists()


def test_finish_output_that_prints_markers_does_not_forge_a_success(tmp_path: Path) -> None:
    """The leftover-removal helper prints paths (a user can name a file anything): its output
    with the old markers, or new-style ones with a guessed nonce, is not what FINISH said."""
    (tmp_path / "var/lib").mkdir(parents=True)
    (tmp_path / "var/lib/reconciler").write_text("a file where the directory should be\n")
    guessed = "0" * 32
    forge = (
        r'open(my $f, ">", "helper-ran"); print "\n\@\@INV ok\n\@\@ID ok\n\@\@J x\n"; '
        rf'print "\n\@\@{guessed}<say.1\nINV ok\n\@\@{guessed}>say.1 0\n"; '
        r'print "\n\@\@-<say.7\nID ok\n\@\@->say.7 0\n"; exit 0'
    )
    out = _finish(tmp_path, inventory=True, identity=THIS, helper=forge)
    assert (tmp_path / "helper-ran").exists()  # the forging output was printed
    assert out == "INV failed"
    assert not (tmp_path / "etc/reconciler/identity").exists()


# ---------------------------------------------------------------- the engine


class _Conn:
    class target:  # noqa: N801 - stands for SshTarget
        address = "192.0.2.77"


class _Pool:
    async def get(self, host: str) -> object:
        return _Conn()


async def test_engine_refuses_with_a_terminal_identity_mismatch_and_adopts_only_named_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reconciler.engine import fleet as engine
    from reconciler.errors import Reason
    from reconciler.fleet.load import load_fleet

    fleet = load_fleet(Path(__file__).resolve().parents[2] / "fleet-repo-example")

    async def observe(conn: object, desired: Desired, **_k: object) -> Observed:
        return Observed(host=desired.host, identity=SeenIdentity(Seen.FILE, A))

    monkeypatch.setattr(engine, "observe_host", observe)
    out = await engine._plan_one(fleet, "web1", _Pool(), None)
    assert out.status == engine.ERROR and out.plan is None and out.result is None
    assert out.error == (
        f"web1 (192.0.2.77) belongs to fleet 'shop-prod' (id {A.fleet_id}) as host 'db2'; this is fleet "
        f"'example' (id {derived_fleet_id('example')}): refusing; use --adopt to take it over"
    )
    assert out.failure is not None and out.failure.reason is Reason.IDENTITY_MISMATCH and out.failure.terminal
    # a planned-only takeover, for the named hosts only
    adopted = await engine._plan_one(fleet, "web1", _Pool(), None, adopt={"web1"})
    assert adopted.plan is not None and adopted.plan.actions[-1].kind is ActionKind.RECORD_IDENTITY
    other = await engine._plan_one(fleet, "web1", _Pool(), None, adopt={"db1"})
    assert other.status == engine.ERROR
