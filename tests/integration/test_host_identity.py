"""Host identity on a real lab host (issue #14): fleet B, pointed at fleet A's host by one wrong
address, is refused by plan, apply and the daemon's engine step with nothing changed on the host
(firewall, files, packages, inventory byte-identical); --adopt takes it over without pruning A's
files; `--lab` refuses a lab made for another fleet, or for none. Real sshd, iptables, dpkg,
apache2, charon; the CLI runs in-process (``reconciler.cli.main``)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import main
from reconciler.daemon.engine_step import engine_step
from reconciler.daemon.step import Target
from reconciler.engine.fleet import ERROR, reconcile_fleet
from reconciler.engine.identity import HostIdentity, derived_fleet_id, parse_identity
from reconciler.errors import Reason, Terminal
from reconciler.fleet.load import load_fleet
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.lab import Lab, LabFleet, LabHostSpec
from tests.lab_plugin import _timeout_paused

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DEBS = Path(__file__).resolve().parents[1] / "fixtures" / "debs"
ADDRESS = "192.0.2.77"  # web1 of fleet A; fleet B's db2 is (wrongly) declared at the same address
A_ID = "shop-a-0001-aaaa"
B_ID = derived_fleet_id("shop-b")  # fleet B pins no id

FLEET = """apiVersion: reconciler/v1
kind: Fleet
name: {name}
{id_line}mesh:
  internal_network: {net}
  mode: tunnel
  datapath: libipsec
firewall:
  management_sources: [192.0.2.254/32]
"""
HOST = """apiVersion: reconciler/v1
kind: Host
name: {name}
public_address: {address}
internal_address: {internal}
roles: [{role}]
"""
FILE = """apiVersion: reconciler/v1
kind: ManagedFile
name: {name}
path: {path}
content: "{content}\\n"
"""
SITE_A = (Path(__file__).resolve().parents[2] / "fleet-repo-example" / "sites" / "shop.yaml").read_text()


def write_repo(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Fleet A: a site, two managed files, the package rcl-hello, the firewall. Fleet B: its host
    db2 at A's web1 address; it purges rcl-hello, opens another port, manages another file."""
    base = tmp_path_factory.mktemp("identity")
    a = write_repo(
        base / "a",
        {
            "fleet.yaml": FLEET.format(name="shop-a", id_line=f"id: {A_ID}\n", net="10.98.0.0/24"),
            "hosts/web1.yaml": HOST.format(name="web1", address=ADDRESS, internal="10.98.0.77", role="shop"),
            "roles/shop.yaml": "apiVersion: reconciler/v1\nkind: Role\nname: shop\npackages: [rcl-hello]\n"
            "ports: [{name: http, port: 80}]\nsites: [shop]\nfiles: [a-conf, a-extra]\n",
            "sites/shop.yaml": SITE_A,
            "files/a-conf.yaml": FILE.format(name="a-conf", path="/etc/shop-a/app.conf", content="fleet A"),
            "files/a-extra.yaml": FILE.format(
                name="a-extra", path="/etc/shop-a/extra.conf", content="A extra"
            ),
        },
    )
    b = write_repo(
        base / "b",
        {
            "fleet.yaml": FLEET.format(name="shop-b", id_line="", net="10.97.0.0/24"),
            "hosts/db2.yaml": HOST.format(name="db2", address=ADDRESS, internal="10.97.0.5", role="db"),
            "roles/db.yaml": "apiVersion: reconciler/v1\nkind: Role\nname: db\npurge_packages: [rcl-hello]\n"
            "ports: [{name: db, port: 3306}]\nfiles: [b-conf]\n",
            "files/b-conf.yaml": FILE.format(name="b-conf", path="/etc/shop-b/b.conf", content="fleet B"),
        },
    )
    return a, b


def build_hello(dest: Path) -> bytes:
    """The fixture package rcl-hello, built with dpkg-deb (as tests/integration/test_packages.py)."""
    tree = dest / "rcl-hello"
    shutil.copytree(DEBS / "rcl-hello", tree, ignore=shutil.ignore_patterns("DIRS"))
    for d in (DEBS / "rcl-hello" / "DIRS").read_text().split():
        (tree / d).mkdir(parents=True, exist_ok=True)
    for p in tree.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    deb = dest / "rcl-hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)], check=True)
    return deb.read_bytes()


@pytest.fixture(scope="module")
def lab(
    lab_factory: Any, repos: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    fleet_a = load_fleet(repos[0])
    lab = lab_factory([LabHostSpec("web1", ADDRESS)], lock_timeout=3000, fleet=LabFleet.of(fleet_a))
    lab.detach()  # the CLI's --lab uses the lab left running, as after `reconciler lab up --fleet`
    deb = build_hello(tmp_path_factory.mktemp("deb"))
    res = lab.exec(
        "web1", ["sh", "-c", "cat > /tmp/hello.deb && dpkg -i /tmp/hello.deb"], input=deb, timeout=120
    )
    assert res.returncode == 0, res.stderr
    yield lab
    lab.down()


def sh(lab: Lab, script: str) -> str:
    res = lab.exec("web1", ["sh", "-c", script], timeout=60)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


# everything fleet B could have touched: every file (path, mode, owner, mtime, size, link, content
# hash) under /etc, the reconciler's state and /srv, the live firewall (rules and policies; packet
# counters move with the test's own SSH traffic), the dpkg database
STATE = (
    "find /etc /var/lib/reconciler /srv -xdev \\( -type f -o -type l \\) "
    "-printf '%p %m %u %g %T@ %s %l\\n' 2>/dev/null | sort; "
    "find /etc /var/lib/reconciler -xdev -type f -exec sha256sum {} + | sort; "
    "iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//g'; "
    "sha256sum /var/lib/dpkg/status; dpkg-query -W -f='${Status}' rcl-hello"
)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def explicit(lab: Lab) -> tuple[str, ...]:
    """Fleet B's way to its hosts: its own ssh files (here the lab's), not --lab."""
    return ("--known-hosts", str(lab.info.known_hosts), "--identity", str(lab.info.client_key))


def identity_on(lab: Lab) -> HostIdentity:
    return parse_identity(sh(lab, "cat /etc/reconciler/identity").encode())


REFUSED = (
    f"db2 ({ADDRESS}) belongs to fleet 'shop-a' (id {A_ID}) as host 'web1'; this is fleet 'shop-b' "
    f"(id {B_ID}): refusing; use --adopt to take it over"
)


def test_first_apply_records_the_identity(lab: Lab, repos: tuple[Path, Path], capsys: Any) -> None:
    code, out = cli(capsys, "plan", str(repos[0]), "--lab")
    assert code == 2, out
    assert "record-identity identity /etc/reconciler/identity" in out and "no identity on the host yet" in out
    code, out = cli(capsys, "apply", str(repos[0]), "--lab", "--yes", "--firewall-window", "4")
    assert code == 0, out
    assert identity_on(lab) == HostIdentity("shop-a", A_ID, "web1")
    assert "identity" not in sh(lab, "ls -a /etc/reconciler | grep reconciler-")  # no temp left
    code, out = cli(capsys, "plan", str(repos[0]), "--lab")
    assert code == 0, out  # in sync: the identity matches, nothing to write again


def test_another_fleet_is_refused_by_plan_apply_and_the_daemon_with_nothing_changed(
    lab: Lab, repos: tuple[Path, Path], capsys: Any
) -> None:
    before = sh(lab, STATE)
    assert "/etc/shop-a/app.conf" in before and "/etc/apache2/sites-available/shop.conf" in before
    assert "install ok installed" in before and "--dport 80" in before

    # --lab: the lab was made for fleet A
    code, out = cli(capsys, "plan", str(repos[1]), "--lab")
    assert code == 1 and "was made for fleet 'shop-a'" in out and "this is fleet 'shop-b'" in out, out

    code, out = cli(capsys, "plan", str(repos[1]), *explicit(lab))
    assert code == 1, out
    assert f"db2: ERROR {REFUSED}" in out, out
    code, out = cli(capsys, "apply", str(repos[1]), "--yes", *explicit(lab))
    assert code == 1 and REFUSED in out, out
    assert "Nothing applied" in out

    fleet_b = load_fleet(repos[1])

    async def daemon_path() -> None:
        targets = targets_for(
            fleet_b, known_hosts=str(lab.info.known_hosts), client_keys=[str(lab.info.client_key)]
        )
        async with ConnectionPool(targets) as pool:
            result = await reconcile_fleet(fleet_b, None, pool, apply=True, firewall_window=4)
            outcome = result.hosts[0]
            assert outcome.status == ERROR and outcome.result is None and outcome.error == REFUSED
            assert outcome.failure is not None and outcome.failure.reason is Reason.IDENTITY_MISMATCH
            assert outcome.failure.terminal
            # the daemon's step raises it: Terminal, no retry until a new commit (or adopt)
            with pytest.raises(Terminal) as err:
                await engine_step("db2", Target("c0ffee", fleet_b, ("db2",)), pool, apply=True)
            assert err.value.reason is Reason.IDENTITY_MISMATCH and str(err.value) == REFUSED

    asyncio.run(daemon_path())
    # positive evidence first: the host answered (it was observed: the refusal quotes its file) ...
    assert identity_on(lab).fleet_id == A_ID
    # ... and is byte-for-byte as before: files and mtimes, inventory, firewall, dpkg database
    assert sh(lab, STATE) == before


def test_adopt_takes_the_host_over_and_prunes_nothing_of_fleet_a(
    lab: Lab, repos: tuple[Path, Path], capsys: Any
) -> None:
    before = sh(lab, STATE)
    code, out = cli(capsys, "plan", str(repos[1]), "--adopt", *explicit(lab))
    assert code == 2, out
    assert f"belongs to fleet 'shop-a' (id {A_ID}) as host 'web1': taken over (--adopt)" in out
    assert "purge-package package rcl-hello" in out
    unpruned = next(line for line in out.splitlines() if "not pruned: " in line)
    assert "/etc/shop-a/app.conf" in unpruned and "/etc/apache2/sites-available/shop.conf" in unpruned, out
    assert "delete" not in out  # nothing of fleet A's is pruned
    assert sh(lab, STATE) == before  # plan --adopt changes nothing either

    code, out = cli(
        capsys, "apply", str(repos[1]), "--adopt", "--yes", "--firewall-window", "4", *explicit(lab)
    )
    assert code == 0, out
    assert identity_on(lab) == HostIdentity("shop-b", B_ID, "db2")
    after = sh(lab, STATE)
    assert "install ok installed" not in after  # B purged the package
    assert "--dport 3306" in after and "--dport 80 " not in after  # B's firewall
    assert "/etc/shop-b/b.conf" in after
    # A's files stay (unmanaged now), and B's inventory does not list them
    for path in ("/etc/shop-a/app.conf", "/etc/shop-a/extra.conf", "/etc/apache2/sites-available/shop.conf"):
        assert f"\n{path} " in after
    inventory = sh(lab, "cat /var/lib/reconciler/inventory.json")
    assert "/etc/shop-b/b.conf" in inventory and "shop-a" not in inventory and "apache2" not in inventory

    code, out = cli(capsys, "plan", str(repos[1]), *explicit(lab))
    assert code == 0, out  # B's host now, in sync
    # and fleet A is refused in turn
    code, out = cli(capsys, "plan", str(repos[0]), "--lab")
    assert code == 1, out
    assert (
        f"web1 ({ADDRESS}) belongs to fleet 'shop-b' (id {B_ID}) as host 'db2'; "
        f"this is fleet 'shop-a' (id {A_ID})" in out
    )


def test_lab_made_for_no_fleet_is_refused_by_lab(lab: Lab, repos: tuple[Path, Path], capsys: Any) -> None:
    lab.down()  # one lab at a time: the CLI below makes its own
    prefix = "rclidt"
    try:
        with _timeout_paused():  # `lab up` may wait in line for the machine-wide lab lock
            code, out = cli(capsys, "lab", "up", "--hosts", "1", "--prefix", prefix, "--wait", "3000")
        assert code == 0 and "made for: no fleet" in out, out
        code, out = cli(capsys, "lab", "status", "--json")
        assert '"fleet": null' in out
        code, out = cli(capsys, "plan", str(repos[0]), "--lab")
        assert code == 1, out
        assert (
            f"--lab: lab {prefix} was made for no fleet (`reconciler lab up --hosts N`); "
            "this is fleet 'shop-a'" in out
        )
        assert "ERROR" not in out  # refused before any host was contacted
    finally:
        cli(capsys, "lab", "down", "--prefix", prefix)
