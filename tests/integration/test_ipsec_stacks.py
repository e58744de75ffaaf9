"""IPsec stack per host on real lab hosts.

1. A host declared ``ipsec: racoon`` on Debian 12 (no racoon, no ipsec-tools in its apt): plan
   and apply refuse it with the reason apt gave, and nothing on it changes (its whole /etc, its
   firewall, its reconciler state, byte for byte); its strongSwan peer is applied as usual.
2. A host carrying a racoon setup (files as an older fleet commit left them, and a running
   "racoon": a stand-in process with racoon's pid file, since Debian 12 cannot run racoon)
   switched to strongSwan: one apply stops racoon before the new files go live, deletes racoon's
   files, and the mesh comes up (libipsec datapath); a second apply is a no-op.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import main
from reconciler.domains.render import render_host
from reconciler.engine.fleet import APPLIED, ERROR, IN_SYNC, reconcile_fleet
from reconciler.engine.plan import ActionKind
from reconciler.errors import Reason
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.lab import Lab, specs_from_fleet

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_verify_mesh import converge, establish, pool_for, verify  # noqa: E402

MIXED = (
    ("aes256gcm16-prfsha384-ecp384]", "aes256gcm16-prfsha384-ecp384, aes256-sha256-modp3072]"),
    (
        "esp_proposals: [aes256gcm16-x25519, aes256gcm16-ecp384]",
        "esp_proposals: [aes256gcm16-x25519, aes256-sha256-modp3072]",
    ),
)
STATE = (
    "find /etc /var/lib/reconciler -xdev \\( -type f -o -type l \\) "
    "-printf '%p %m %u %g %T@ %s %l\\n' 2>/dev/null | sort; "
    "find /etc /var/lib/reconciler -xdev -type f -exec sha256sum {} + 2>/dev/null | sort; "
    "iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//g'"
)


def make_repo(tmp: Path, *, racoon: tuple[str, ...], datapath: str) -> Path:
    repo = tmp / f"fleet-{datapath}"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    text = (repo / "fleet.yaml").read_text()
    for old, new in MIXED:
        text = text.replace(old, new)
    if datapath == "libipsec":
        text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    (repo / "fleet.yaml").write_text(text)
    for h in ("web1", "web2"):  # two hosts: one pair
        (repo / "hosts" / f"{h}.yaml").unlink()
    for h in racoon:
        p = repo / "hosts" / f"{h}.yaml"
        p.write_text(p.read_text() + "ipsec: racoon\n")
    # no AppArmor profile for mysqld on this machine: the db role's profile is not the point here
    role = repo / "roles" / "db.yaml"
    role.write_text(role.read_text().replace("apparmor: [usr.sbin.mysqld]\n", ""))
    return repo


def sh(lab: Lab, host: str, script: str) -> str:
    res = lab.exec(host, ["sh", "-c", script], timeout=60)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def racoon_lab(lab_factory: Any, tmp_path: Path) -> Iterator[tuple[Path, Lab]]:
    repo = make_repo(tmp_path, racoon=("db1",), datapath="kernel")
    lab = lab_factory(specs_from_fleet(load_fleet(repo)))
    yield repo, lab
    lab.down()


def test_a_racoon_host_on_debian_12_is_refused_in_plan_with_nothing_touched(
    racoon_lab: tuple[Path, Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    repo, lab = racoon_lab
    assert main(["validate", str(repo)]) == 0  # valid: only the host's apt can tell
    capsys.readouterr()
    before = sh(lab, "db1", STATE)
    access = ("--known-hosts", str(lab.info.known_hosts), "--identity", str(lab.info.client_key))
    code, out = cli(capsys, "plan", str(repo), *access)
    assert code == 1, out
    assert "db1: ERROR" in out and "ipsec: racoon cannot run on this host" in out, out
    assert "apt has no install candidate for ipsec-tools, racoon" in out, out

    fleet = load_fleet(repo)

    async def apply() -> None:
        async with pool_for(fleet, lab) as pool:
            result = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=4)
        by = {h.host: h for h in result.hosts}
        assert by["db1"].status == ERROR and by["db1"].result is None
        assert by["db1"].failure is not None and by["db1"].failure.reason is Reason.REFUSED
        assert by["db1"].failure.terminal
        assert by["db2"].status == APPLIED, by["db2"].error

    asyncio.run(apply())
    # positive evidence: db2, applied in the same run, has its strongSwan files and identity ...
    assert "/etc/swanctl/conf.d" in sh(lab, "db2", "ls -d /etc/swanctl/conf.d /etc/reconciler/identity")
    # ... and db1 is byte for byte as before: no file of either stack, no firewall, no identity
    after = sh(lab, "db1", STATE)
    assert after == before
    assert "/etc/reconciler/identity" not in after and "/etc/iptables/rules.v4" not in after


# ---------------------------------------------------------------- racoon -> strongSwan


RACOON_STANDIN = (
    # racoon cannot run on Debian 12: a process holding racoon's pid file stands in for it
    "mkdir -p /var/run && setsid -f sh -c 'echo $$ > /var/run/racoon.pid; exec sleep 100000' "
    "</dev/null >/dev/null 2>&1; i=0; while [ ! -s /var/run/racoon.pid ] && [ $i -lt 50 ]; do sleep 0.1; "
    "i=$((i+1)); done; cat /var/run/racoon.pid"
)


def plant_racoon(lab: Lab, old: Fleet, host: str) -> None:
    """What an apply of the older (racoon) commit left on the host: its rendered racoon files
    (and a peer key file), and racoon running."""
    desired = render_host(old, old.host(host))
    files = {f.path: f.content for f in desired.files if "racoon" in f.path or "ipsec-tools" in f.path}
    files["/etc/racoon/peers/db2.pub"] = b": PUB 0sAwEAAQ==\n"
    assert "/etc/racoon/racoon.conf" in files and "/etc/ipsec-tools.conf" in files
    for path, content in files.items():
        res = lab.exec(
            host, ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path], input=content
        )
        assert res.returncode == 0, res.stderr
    pid = sh(lab, host, RACOON_STANDIN).strip()
    assert pid.isdigit() and sh(lab, host, f"kill -0 {pid} && echo alive").strip() == "alive"


@pytest.fixture
def switch_lab(lab_factory: Any, tmp_path: Path) -> Iterator[tuple[Path, Path, Lab]]:
    old = make_repo(tmp_path / "old", racoon=("db1",), datapath="kernel")
    new = make_repo(tmp_path / "new", racoon=(), datapath="libipsec")
    lab = lab_factory(specs_from_fleet(load_fleet(new)))
    yield old, new, lab
    lab.down()


def test_a_host_switched_from_racoon_to_strongswan_drops_racoon_and_its_mesh_comes_up(
    switch_lab: tuple[Path, Path, Lab],
) -> None:
    old, new, lab = switch_lab
    plant_racoon(lab, load_fleet(old), "db1")
    pid = sh(lab, "db1", "cat /var/run/racoon.pid").strip()

    fleet = load_fleet(new)

    async def plan() -> None:
        async with pool_for(fleet, lab) as pool:
            result = await reconcile_fleet(fleet, ["db1"], pool, apply=False)
        p = result.hosts[0].plan
        assert p is not None, result.hosts[0].error
        kinds = [(a.kind, a.resource) for a in p.actions]
        assert (ActionKind.STOP_SERVICE, "service racoon") in kinds
        deleted = {a.path for a in p.actions if a.kind is ActionKind.DELETE}
        assert {"/etc/ipsec-tools.conf", "/etc/racoon/racoon.conf", "/etc/racoon/peers/db2.pub"} <= deleted

    asyncio.run(plan())
    fleet = converge(new, lab)
    establish(fleet, lab)
    # racoon is gone: its process, its pid file's process, its configuration
    assert sh(lab, "db1", f"kill -0 {pid} 2>/dev/null && echo alive || echo gone").strip() == "gone"
    left = sh(lab, "db1", "ls /etc/ipsec-tools.conf /etc/racoon/racoon.conf /etc/racoon/peers/db2.pub 2>&1")
    assert left.count("No such file") == 3, left
    # the mesh link is up on the libipsec datapath: IKE, CHILD_SA and ping through it
    report = verify(fleet, lab, advance_cursor=False, host_timeout=120)
    failed = [(c.host, c.peer, c.name, c.cause) for c in report.checks if c.status.name == "FAIL"]
    assert not report.failed_pairs() and not failed, failed

    # nothing left to do
    async def again() -> None:
        async with pool_for(fleet, lab) as pool:
            result = await reconcile_fleet(fleet, None, pool, apply=False)
        assert all(h.status == IN_SYNC for h in result.hosts), [
            (h.host, h.status, h.error) for h in result.hosts
        ]

    asyncio.run(again())
