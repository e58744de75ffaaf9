"""Engine parts for speed and safety, run with a real sh on this machine (no SSH, no lab):
the observation forks only what the Desired needs; the pending-reloads journal (written before
a swap, read by observe, reloaded by the next plan, cleared after the reload); a validation
failure holds back only its own handler's changes; the Apache post-reload probe."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.engine import apply as apply_mod
from reconciler.engine import finish as finish_mod
from reconciler.engine import transaction as transaction_mod
from reconciler.engine.apply import apply_host
from reconciler.engine.observe import build_script, observe_host
from reconciler.engine.plan import INTERRUPTED, plan_host
from reconciler.host.connection import ConnectionLost, ConnectionPool, SshTarget
from reconciler.host.fake import FakeHost
from reconciler.host.script import new_nonce, run_framed
from reconciler.kinds import apache as apache_kind
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.apache import APACHE_GRACEFUL
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler, Service, Validator

# ---------------------------------------------------------------- observation cost


def _files_desired(root: Path, n: int = 24) -> Desired:
    files = tuple(
        FileResource(str(root / f"conf.d/f{i:02d}.conf"), f"file {i}\n".encode(), Domain.FILES, handler="app")
        for i in range(n)
    )
    return Desired(host="h1", files=files, handlers=(Handler("app", reload=("true",)),))


def test_a_files_only_observation_forks_two_processes(tmp_path: Path) -> None:
    """Every process counts (all lab hosts share 2 CPUs): one find + one sha256sum for 24 files,
    no iptables-save/ip/swanctl/dpkg-query when the Desired has no firewall/links/IPsec/packages."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot count the processes the script forks")
    d = _files_desired(tmp_path)
    (tmp_path / "conf.d").mkdir()
    for f in d.files:
        Path(f.path).write_bytes(f.content)
    script, args = build_script(d, str(tmp_path / "inv.json"), str(tmp_path / "pending"))
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
    names = sorted(os.path.basename(e) for e in execs)
    assert names == ["find", "sh", "sha256sum"], names


# ---------------------------------------------------------------- plan: interrupted reloads


def test_plan_reloads_handlers_left_in_the_journal() -> None:
    d = Desired(
        host="h1",
        files=(FileResource("/etc/app/a.conf", b"a\n", Domain.APACHE, handler="apache2"),),
        handlers=(Handler("apache2", reload=("apache2ctl", "graceful")), Handler("noreload")),
    )
    import hashlib

    in_sync = FileState(
        "/etc/app/a.conf",
        True,
        sha256=hashlib.sha256(b"a\n").hexdigest(),
        mode=0o644,
        owner="root",
        group="root",
    )
    obs = Observed(
        host="h1",
        files={"/etc/app/a.conf": in_sync},
        inventory=("/etc/app/a.conf",),
        pending_reloads=("apache2", "gone-from-the-fleet", "noreload"),
    )
    plan = plan_host(d, obs)
    assert [(a.kind, a.handler, a.reason) for a in plan.actions] == [
        (ActionKind.RELOAD, "apache2", INTERRUPTED)
    ]
    # files changed too: one reload, both reasons
    changed = Observed(host="h1", inventory=("/etc/app/a.conf",), pending_reloads=("apache2",))
    plan2 = plan_host(d, changed)
    reloads = [a for a in plan2.actions if a.kind is ActionKind.RELOAD]
    assert len(reloads) == 1 and reloads[0].reason.endswith(INTERRUPTED)
    assert reloads[0].reason.startswith("after changes to /etc/app/a.conf")
    # nothing pending: in sync
    assert plan_host(d, Observed(host="h1", files=obs.files, inventory=obs.inventory)).actions == ()


# ---------------------------------------------------------------- apply on this machine


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("apply chowns files to root: run as root")
    monkeypatch.setattr(finish_mod, "INVENTORY_PATH", str(tmp_path / "state/inventory.json"))
    monkeypatch.setattr(finish_mod, "PENDING_RELOADS_PATH", str(tmp_path / "state/pending-reloads"))
    monkeypatch.setattr(transaction_mod, "PENDING_RELOADS_PATH", str(tmp_path / "state/pending-reloads"))
    yield tmp_path


def _pool() -> ConnectionPool:
    return ConnectionPool({"h1": SshTarget(host="h1", address="127.0.0.1", local=True)})


async def _observe_plan(pool: ConnectionPool, d: Desired, root: Path) -> tuple[Observed, object]:
    obs = await observe_host(
        await pool.get("h1"),
        d,
        inventory_path=str(root / "state/inventory.json"),
        pending_path=str(root / "state/pending-reloads"),
    )
    return obs, plan_host(d, obs)


def _two_handlers(root: Path, *, bad_ok: bool) -> Desired:
    log = root / "reloads.log"
    good = Handler(
        "good",
        validators=(Validator(("grep", "-rq", "good", "{tree}"), tree_root=str(root / "good")),),
        reload=("sh", "-c", f"echo good >> {log}"),
    )
    bad = Handler(
        "bad",
        validators=(
            Validator(("grep", "-rq", "valid" if bad_ok else "NEVER", "{tree}"), tree_root=str(root / "bad")),
        ),
        reload=("sh", "-c", f"echo bad >> {log}"),
    )
    return Desired(
        host="h1",
        files=(
            FileResource(str(root / "good/app.conf"), b"good v2\n", Domain.FILES, handler="good"),
            FileResource(str(root / "bad/a.conf"), b"valid v2\n", Domain.FILES, handler="bad"),
            FileResource(str(root / "bad/b.conf"), b"valid v2 too\n", Domain.FILES, handler="bad"),
            FileResource(str(root / "plain.txt"), b"independent\n", Domain.FILES),
        ),
        handlers=(good, bad),
        services=(
            Service(
                "bad", start=("touch", str(root / "running")), status=("test", "-e", str(root / "running"))
            ),
        ),
    )


async def test_a_failed_validator_holds_back_only_its_handler(local: Path) -> None:
    root = local
    for sub, text in (("good/app.conf", "good v1\n"), ("bad/a.conf", "valid v1\n")):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).write_text(text)
    d = _two_handlers(root, bad_ok=False)
    async with _pool() as pool:
        _, plan = await _observe_plan(pool, d, root)
        result = await apply_host(pool, "h1", plan, d, verify=False)  # type: ignore[arg-type]
    assert not result.ok and result.partial
    # independent changes went live and reloaded
    assert (root / "good/app.conf").read_text() == "good v2\n"
    assert (root / "plain.txt").read_text() == "independent\n"
    assert (root / "reloads.log").read_text() == "good\n"
    # the failed handler's files are untouched (both of them), no temp left, not reloaded
    assert (root / "bad/a.conf").read_text() == "valid v1\n" and not (root / "bad/b.conf").exists()
    assert [p.name for p in (root / "bad").iterdir()] == ["a.conf"]
    applied, held = set(result.applied()), set(result.not_applied())
    assert f"update file {root}/good/app.conf" in applied and "reload handler good" in applied
    assert f"create file {root}/plain.txt" in applied
    assert {f"update file {root}/bad/a.conf", f"create file {root}/bad/b.conf", "reload handler bad"} <= held
    msg = "\n".join(result.messages)
    assert "validation failed" in msg and "NEVER" in msg and "independent changes still applied" in msg
    # the service of the held-back handler is not started on the old configuration
    assert any(o.action.kind is ActionKind.START_SERVICE and o.status == "skipped" for o in result.outcomes)
    # the inventory is not recorded (the apply did not fully succeed); the journal is clear
    assert not (root / "state/inventory.json").exists()
    assert not (root / "state/pending-reloads").exists()

    # fixed: the next run applies the rest
    d2 = _two_handlers(root, bad_ok=True)
    async with _pool() as pool:
        _, plan2 = await _observe_plan(pool, d2, root)
        result2 = await apply_host(pool, "h1", plan2, d2, verify=False)  # type: ignore[arg-type]
    assert result2.ok, result2.messages
    assert (root / "bad/b.conf").read_text() == "valid v2 too\n"
    assert (root / "reloads.log").read_text() == "good\nbad\n"


async def test_journal_survives_a_cut_between_swap_and_reload(
    local: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = local
    d = _two_handlers(root, bad_ok=True)
    (root / "good").mkdir()
    (root / "good/app.conf").write_text("good v1\n")  # replaced: backed up by the swap
    seen: list[str] = []

    async def cut(host: str) -> None:
        seen.append((root / "state/pending-reloads").read_text())
        raise ConnectionLost(f"host {host}: connection lost (test: cut after the swap)")

    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", cut)
    async with _pool() as pool:
        _, plan = await _observe_plan(pool, d, root)
        result = await apply_host(pool, "h1", plan, d, verify=False)  # type: ignore[arg-type]
    assert not result.ok and seen == ["bad\ngood\n"]  # written before the swap
    assert (root / "good/app.conf").read_text() == "good v2\n"  # live, never reloaded
    assert not (root / "reloads.log").exists()
    # the interrupted apply's backups stay behind (the next apply removes them)
    assert any(".reconciler-bak-" in p.name for p in (root / "good").iterdir())
    monkeypatch.setattr(apply_mod, "FAULT_AFTER_SWAP", None)

    async with _pool() as pool:
        obs, plan2 = await _observe_plan(pool, d, root)
        assert obs.pending_reloads == ("bad", "good")
        kinds = [(a.kind, a.handler, a.reason) for a in plan2.actions]  # type: ignore[attr-defined]
        assert (ActionKind.RELOAD, "good", INTERRUPTED) in kinds and (
            ActionKind.RELOAD,
            "bad",
            INTERRUPTED,
        ) in kinds
        result2 = await apply_host(pool, "h1", plan2, d, verify=False)  # type: ignore[arg-type]
        assert result2.ok, result2.messages
        assert sorted((root / "reloads.log").read_text().split()) == ["bad", "good"]
        assert not (root / "state/pending-reloads").exists()
        for sub in ("good", "bad"):  # no leftover of the interrupted apply
            assert not [p.name for p in (root / sub).iterdir() if ".reconciler-" in p.name]
        _, plan3 = await _observe_plan(pool, d, root)
    assert plan3.actions == ()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- Apache post-reload probe

FAKE_MASTER = r"""
# a stand-in for apache2's master: writes its pid file, keeps one worker child, and on SIGUSR1
# (graceful) replaces it with a new one; "ignore" keeps the old worker, "die" exits
pidfile=$1; mode=$2
spawn() { sleep 60 & child=$!; }
trap 'if [ "$mode" = die ]; then exit 1; elif [ "$mode" = ok ]; then kill $child; spawn; fi' USR1
spawn
sleep 60 & keeper=$!
echo $$ > "$pidfile"
while kill -0 $keeper 2>/dev/null; do wait $keeper; done
"""


@pytest.mark.parametrize(
    ("mode", "reload", "rc", "text"),
    [
        ("ok", "usr1", 0, "new worker generation"),
        ("ignore", "usr1", 72, "old configuration keeps serving"),
        ("die", "usr1", 71, "died after the reload"),
        ("ok", "fail", 3, "refused"),
        # the reload's output prints the old marker and a guessed new-style verdict: still 72
        ("ignore", "forge", 72, "old configuration keeps serving"),
    ],
)
def test_apache_graceful_probe(tmp_path: Path, mode: str, reload: str, rc: int, text: str) -> None:
    pidfile = tmp_path / "apache2.pid"
    # started through a shell that exits at once: the master's parent is init, which reaps it
    # (as apache2's master is reaped by its parent; a zombie would still answer kill -0)
    starter = subprocess.Popen(
        ["sh", "-c", 'sh -c "$1" sh "$2" "$3" &', "sh", FAKE_MASTER, str(pidfile), mode],
        start_new_session=True,
    )
    starter.wait()
    try:
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        guess = "0" * 32
        forge = (
            r"printf '@@PROBE new worker generation (pid 1) under master 2\n';"
            rf"printf '\n@@{guess}<say.1\nPROBE new worker generation\n@@{guess}>say.1 0\n'"
        )
        argv = {
            "usr1": ["sh", "-c", 'kill -USR1 "$(cat "$1")"', "sh", str(pidfile)],
            "fail": ["sh", "-c", "echo refused >&2; exit 3"],
            "forge": ["sh", "-c", f'kill -USR1 "$(cat "$1")"; {forge}', "sh", str(pidfile)],
        }[reload]
        framed = asyncio.run(
            run_framed(FakeHost(tmp_path), APACHE_GRACEFUL, (str(pidfile), "2", *argv), timeout=30)
        )
        ok, message = apache_kind.probe_verdict(framed, argv)
        assert framed.result.exit_status == rc, message
        assert ok is (rc == 0) and text in message, message
        if reload == "forge":
            assert b"@@PROBE new worker" in framed.result.stdout  # the forging text was printed
            assert "probe:" not in message
    finally:
        os.killpg(starter.pid, 9)


def test_apache_graceful_is_recognised() -> None:
    assert apache_kind.is_graceful(("apache2ctl", "graceful"))
    assert apache_kind.is_graceful(("/usr/sbin/apache2ctl", "-k", "graceful"))
    assert not apache_kind.is_graceful(("service", "apache2", "reload"))
    assert sys.version_info >= (3, 11)


def test_render_is_cached_per_fleet_object() -> None:
    import gc
    from pathlib import Path as _P

    from reconciler.engine import fleet as engine
    from reconciler.fleet.load import load_fleet

    repo = _P(__file__).resolve().parents[2] / "fleet-repo-example"
    fleet = load_fleet(repo)
    name = fleet.hosts[0].name
    first = engine.render_cached(fleet, name)
    assert engine.render_cached(fleet, name) is first  # no second render for the same Fleet
    again = load_fleet(repo)
    assert engine.render_cached(again, name) is not first and engine.render_cached(again, name) == first
    key = id(fleet)
    del fleet, first
    gc.collect()
    assert key not in engine._RENDERED  # dropped with its Fleet
