"""Path safety in the observation, the plan, the fleet and a local apply: refused paths are a
typed state (never read through), planned as ``refused`` with the reason (never a diff), failed
by apply while independent changes still apply; ``controlled_dir`` in the fleet."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from types import MappingProxyType

import pytest

from reconciler.domains.render import render_host
from reconciler.engine import finish as finish_mod
from reconciler.engine import transaction as transaction_mod
from reconciler.engine.apply import apply_host
from reconciler.engine.observe import build_script, observe_host
from reconciler.engine.plan import plan_host
from reconciler.engine.planview import _Paint, render_host_plan
from reconciler.errors import FleetInvalid, Reason
from reconciler.fleet.load import load_fleet_files, read_tree
from reconciler.host.connection import ConnectionPool, SshTarget
from reconciler.host.script import Section
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.files import parse_ids, probe_for
from reconciler.kinds.filestate import judged, owned_states
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler, KeyPair, LinkResource

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"


def d(
    path: str, *, uid: int = 0, mode: int = 0o755, kind: str = "dir", target: str | None = None
) -> FileState:
    owner = "root" if uid == 0 else "u"
    return FileState(path, True, kind=kind, mode=mode, owner=owner, group=owner, uid=uid, link_target=target)


ROOT_DIRS = {"/": d("/"), "/etc": d("/etc"), "/home": d("/home")}


def test_judged_refuses_links_and_other_users_directories_and_reads_nothing_through_them() -> None:
    f = FileState(
        "/home/deploy/.ssh/authorized_keys", True, sha256="ab" * 32, mode=0o600, owner="root", uid=0
    )
    records = {**ROOT_DIRS, "/home/deploy": d("/home/deploy", uid=1001, mode=0o700)}
    got = judged({f.path: f}, records)[f.path]
    assert got.refused == "/home/deploy is writable by uid 1001 (u)" and got.sha256 is None and not got.exists
    records["/home/deploy"] = d("/home/deploy", kind="link", target="/root")
    assert judged({f.path: f}, records)[f.path].refused == "/home/deploy is a symlink to /root"
    records["/home/deploy"] = d("/home/deploy")
    records["/home/deploy/.ssh"] = d("/home/deploy/.ssh", mode=0o775)
    assert judged({f.path: f}, records)[f.path].refused == "/home/deploy/.ssh is writable by group root"
    records["/home/deploy/.ssh"] = d("/home/deploy/.ssh", mode=0o700)
    assert judged({f.path: f}, records)[f.path] == f  # root's alone: the record stands
    del records["/home/deploy/.ssh"]  # a missing directory: the path is simply absent
    assert judged({f.path: f}, records)[f.path] == f


def test_files_under_a_shaky_owned_directory_are_refused() -> None:
    found = {"/etc/swanctl/conf.d/old.conf": FileState("/etc/swanctl/conf.d/old.conf", True)}
    records = {**ROOT_DIRS, "/etc/swanctl": d("/etc/swanctl", mode=0o777), "/etc/swanctl/conf.d": d("/x")}
    got = owned_states(found, ["/etc/swanctl/conf.d"], records)
    assert got["/etc/swanctl/conf.d/old.conf"].refused == "/etc/swanctl is writable by every user (mode 0777)"


def test_plan_shows_refusals_never_diffs() -> None:
    keys = FileResource(
        "/home/deploy/.ssh/authorized_keys", b"ssh-ed25519 AAAA\n", Domain.FILES, owner="deploy"
    )
    link = LinkResource("/home/deploy/.profile", "/etc/skel/.profile", Domain.FILES)
    kp = KeyPair(
        "strongswan", "/etc/swanctl/private/k.pem", "/etc/swanctl/pubkey/k.pub", generate=(("true",),)
    )
    why = "/home/deploy/.ssh is a symlink to /root/.ssh"
    refused = {
        p: FileState(p, False, kind="other", refused=why)
        for p in (keys.path, link.path, kp.private_path, "/etc/old/gone.conf")
    }
    obs = Observed(host="h", files=MappingProxyType(refused), inventory=("/etc/old/gone.conf",))
    plan = plan_host(Desired(host="h", files=(keys,), links=(link,), keypairs=(kp,)), obs)
    got = {a.resource: (a.kind, a.reason, a.diff) for a in plan.actions}
    tail = "; nothing read or changed through it"
    assert got == {
        f"file {keys.path}": (ActionKind.REFUSED, f"refused: {why}{tail}", ""),
        f"link {link.path}": (ActionKind.REFUSED, f"refused: {why}{tail}", ""),
        "keypair strongswan": (ActionKind.REFUSED, f"refused: {why}{tail}", ""),
        "file /etc/old/gone.conf": (ActionKind.REFUSED, f"left the fleet, but not deleted: {why}", ""),
    }
    text = "\n".join(render_host_plan(plan, _Paint(False)))
    assert f"! refused file {keys.path}  (refused: {why}" in text
    assert plan.counts()["change"] == 4 and plan.errors == ()


def test_plan_names_unknown_owners() -> None:
    f = FileResource("/etc/app.conf", b"x\n", Domain.FILES, owner="nosuchuser", group="nosuchgroup")
    obs = Observed(
        host="h", unknown_users=frozenset({"nosuchuser"}), unknown_groups=frozenset({"nosuchgroup"})
    )
    (a,) = [
        a
        for a in plan_host(Desired(host="h", files=(f,)), obs).actions
        if a.kind is not ActionKind.RECORD_INVENTORY
    ]
    assert a.kind is ActionKind.REFUSED
    assert a.reason == (
        "no user nosuchuser and no group nosuchgroup on this host (owner nosuchuser:nosuchgroup); "
        "nothing changed"
    )


def test_probe_sends_controlled_paths_to_the_helper_and_judges_the_others() -> None:
    ctl = FileResource(
        "/home/deploy/.ssh/authorized_keys",
        b"k\n",
        Domain.FILES,
        owner="deploy",
        controlled_dir="/home/deploy",
        controlled_by="deploy",
    )
    plain = FileResource("/etc/app/app.conf", b"x\n", Domain.FILES)
    probe = probe_for(Desired(host="h", files=(ctl, plain)))
    assert probe.hashed == ("/etc/app/app.conf",) and [p for p, _, _ in probe.guarded] == [ctl.path]
    assert probe.ancestors() == ("/", "/etc", "/etc/app") and probe.users == ("deploy",)
    script, args = build_script(Desired(host="h", files=(plain,)))
    assert "perl" not in script and args[1:5] == ["/", "/etc", "/etc/app", "/etc/app/app.conf"]
    script, args = build_script(Desired(host="h", files=(ctl, plain)))
    assert "RCL_N=$N perl -e" in script and "u:deploy" in args
    assert parse_ids(Section("ids", b"u deploy 1\ng nogroupx 0\n", 0), probe, []) == (
        frozenset(),
        frozenset({"nogroupx"}),
    )


# ---------------------------------------------------------------- the fleet field


def _fleet_with(owner: str, extra: str) -> dict[str, bytes]:
    files, _ = read_tree(EXAMPLE)
    files = dict(files)
    motd = (
        files["files/motd.yaml"]
        .decode()
        .replace("path: /etc/motd", "path: /home/deploy/.ssh/authorized_keys")
    )
    files["files/motd.yaml"] = (motd.replace("owner: root", f"owner: {owner}") + extra).encode()
    return files


def test_controlled_dir_reaches_the_rendered_file() -> None:
    fleet = load_fleet_files(_fleet_with("deploy", "controlled_dir: {path: /home/deploy}\n"))
    mf = fleet.files["motd"]
    assert mf.controlled_dir is not None and mf.controlled_by == "deploy"
    host = next(h for h in fleet.hosts if "motd" in {f for r in fleet.roles_of(h) for f in r.files})
    f = next(f for f in render_host(fleet, host).files if f.path == mf.path)
    assert (f.controlled_dir, f.controlled_by) == ("/home/deploy", "deploy")


@pytest.mark.parametrize(
    ("owner", "extra", "message"),
    [
        ("deploy", "controlled_dir: {path: /home/other}\n", "is not a directory above"),
        ("root", "controlled_dir: {path: /home/deploy}\n", "name the non-root user"),
        ("deploy", "controlled_dir: {path: /home/deploy, user: root}\n", "name the non-root user"),
        ("deploy", "controlled_dir: {path: /home/deploy, usr: x}\n", "usr"),
    ],
)
def test_controlled_dir_errors(owner: str, extra: str, message: str) -> None:
    with pytest.raises(FleetInvalid) as info:
        load_fleet_files(_fleet_with(owner, extra))
    assert any(message in str(p) and "files/motd.yaml" in str(p) for p in info.value.problems), (
        info.value.problems
    )


# ---------------------------------------------------------------- a local apply (as root)


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if os.geteuid() != 0:
        pytest.skip("apply chowns files: run as root")
    monkeypatch.setattr(finish_mod, "INVENTORY_PATH", str(tmp_path / "state/inventory.json"))
    monkeypatch.setattr(finish_mod, "PENDING_RELOADS_PATH", str(tmp_path / "state/pending-reloads"))
    monkeypatch.setattr(transaction_mod, "PENDING_RELOADS_PATH", str(tmp_path / "state/pending-reloads"))
    os.chmod(tmp_path, 0o755)
    return tmp_path


async def test_a_refused_file_fails_holds_back_its_handler_and_independent_ones_apply(local: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    theirs = local / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    log = local / "reloads.log"
    d = Desired(
        host="h1",
        files=(
            FileResource(str(theirs / "a.conf"), b"a\n", Domain.FILES, handler="app"),
            FileResource(str(local / "app" / "b.conf"), b"b\n", Domain.FILES, handler="app"),
            FileResource(str(local / "plain.txt"), b"independent\n", Domain.FILES),
        ),
        handlers=(Handler("app", reload=("sh", "-c", f"echo app >> {log}")),),
    )
    async with ConnectionPool({"h1": SshTarget(host="h1", address="127.0.0.1", local=True)}) as pool:
        obs = await observe_host(
            await pool.get("h1"),
            d,
            inventory_path=str(local / "state/inventory.json"),
            pending_path=str(local / "state/pending-reloads"),
        )
        plan = plan_host(d, obs)
        result = await apply_host(pool, "h1", plan, d, verify=False)
    status = {o.action.resource: (o.status, o.message) for o in result.outcomes}
    assert status[f"file {theirs}/a.conf"] == (
        "failed",
        f"refused: {theirs} is writable by uid {nobody.pw_uid} (nobody); nothing read or changed through it",
    )
    assert status[f"file {local}/app/b.conf"][0] == "skipped"  # same handler: held back
    assert status["handler app"][0] == "skipped" and not log.exists()
    assert (
        status[f"file {local}/plain.txt"][0] == "done"
        and (local / "plain.txt").read_text() == "independent\n"
    )
    assert not result.ok and result.partial
    assert result.failure is not None and result.failure.reason is Reason.REFUSED
    assert os.listdir(theirs) == [] and not (local / "app").exists()
