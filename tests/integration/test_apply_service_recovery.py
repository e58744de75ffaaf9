"""A config that breaks its service at reload, on a real lab host with a real Apache.

A site on ``port: 22`` passes validation (``apache2ctl -t``), but the graceful reload kills the
master (sshd holds port 22). The apply must restore the old files AND bring Apache back up on
them, proven (a real HTTP request answered), and report the failure as terminal
(``reload-broke-service``). An Apache that is down is started on its live files before anything
new is swapped in, so the next apply's reload is never a no-op that lets the bad files go live.
An Apache that does not start on its live files either is started on the new, validated files.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.fleet import APPLIED, FAILED, IN_SYNC, HostOutcome, reconcile_fleet
from reconciler.errors import Reason
from reconciler.fleet.load import load_fleet
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.kinds.actions import ActionKind
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"
WINDOW = 4.0
HOST = "web1"
SITE = "/etc/apache2/sites-available/shop.conf"
HARDENING = "/etc/apache2/conf-available/zz-reconciler.conf"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fleet") / "repo"
    shutil.copytree(EXAMPLE, dest)
    return dest


@pytest.fixture(scope="module")
def bad_repo(repo: Path) -> Path:
    """The same fleet with the site on port 22 (valid YAML, valid Apache syntax)."""
    dest = repo.parent / "bad"
    shutil.copytree(repo, dest)
    site = dest / "sites" / "shop.yaml"
    site.write_text(site.read_text() + "port: 22\n")
    return dest


@pytest.fixture(scope="module")
def lab(lab_factory: Any, repo: Path) -> Iterator[Lab]:
    web = next(h for h in load_fleet(repo).hosts if h.name == HOST)
    lab = lab_factory([LabHostSpec(HOST, str(web.public_address))], lock_timeout=3000)
    yield lab
    lab.down()


def sh(lab: Lab, script: str) -> str:
    res = lab.exec(HOST, ["sh", "-c", script])
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def http_code(lab: Lab) -> str:
    """A real HTTP request from the machine to the site: "000" when nothing answers."""
    address = next(h.address for h in lab.info.hosts if h.name == HOST)
    res = subprocess.run(
        ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: shop.example.com",
         f"http://{address}/"],
        capture_output=True, check=False, timeout=15,
    )  # fmt: skip
    return res.stdout.decode().strip() or "000"


def apache_pid(lab: Lab) -> str:
    return sh(lab, 'p=$(cat /var/run/apache2/apache2.pid 2>/dev/null) && kill -0 "$p" && echo "$p"').strip()


async def reconcile(lab: Lab, repo: Path) -> HostOutcome:
    fleet = load_fleet(repo)
    info = lab.info
    targets = targets_for(
        fleet,
        known_hosts=str(info.known_hosts),
        client_keys=[str(info.client_key)],
        address_override={h.name: h.address for h in info.hosts},
    )
    async with ConnectionPool({HOST: targets[HOST]}) as pool:
        result = await reconcile_fleet(fleet, [HOST], pool, apply=True, firewall_window=WINDOW)
    return result.hosts[0]


async def test_good_fleet_converges_and_serves(lab: Lab, repo: Path) -> None:
    out = await reconcile(lab, repo)
    assert out.status == APPLIED, out.error
    assert apache_pid(lab) and http_code(lab) != "000"


async def test_reload_that_kills_apache_restores_and_restarts_it(
    lab: Lab, repo: Path, bad_repo: Path
) -> None:
    site_before = sh(lab, f"sha256sum {SITE} {HARDENING}")
    out = await reconcile(lab, bad_repo)
    assert out.status == FAILED and out.failure is not None, out
    assert out.failure.reason is Reason.RELOAD_BROKE_SERVICE and out.failure.terminal, out.failure
    assert out.result is not None
    text = "\n".join(out.result.messages)
    assert "died after the reload" in text and "files were restored" in text, text
    assert "started again on them" in text, text
    # the old files are live, Apache runs on them and answers a real request
    assert sh(lab, f"sha256sum {SITE} {HARDENING}") == site_before
    assert apache_pid(lab), sh(lab, "tail -n 5 /var/log/apache2/error.log")
    assert http_code(lab) != "000"
    assert sh(lab, "find /etc/apache2 -name '.*.reconciler-*'").strip() == ""


async def test_down_apache_is_started_on_its_live_files_before_the_swap(
    lab: Lab, repo: Path, bad_repo: Path
) -> None:
    """The issue's second half: Apache left down, then the same bad commit applied again. The
    reload must not be a no-op "not running" that lets the bad files go live."""
    sh(lab, "apache2ctl stop; sleep 1")
    assert not apache_pid(lab) and http_code(lab) == "000"
    site_before = sh(lab, f"sha256sum {SITE} {HARDENING}")
    out = await reconcile(lab, bad_repo)
    assert out.plan is not None and out.result is not None
    kinds = [a.kind for a in out.plan.actions]
    assert ActionKind.START_SERVICE in kinds and ActionKind.RELOAD in kinds, kinds
    start = next(o for o in out.result.outcomes if o.action.kind is ActionKind.START_SERVICE)
    assert start.status == "done" and "before the new one was swapped in" in start.message, start
    assert out.failure is not None and out.failure.reason is Reason.RELOAD_BROKE_SERVICE, out.failure
    assert sh(lab, f"sha256sum {SITE} {HARDENING}") == site_before
    assert apache_pid(lab) and http_code(lab) != "000"


async def test_down_apache_that_does_not_start_on_its_live_files_starts_on_the_new_ones(
    lab: Lab, repo: Path
) -> None:
    """The live config itself cannot start (a hand edit: Listen 22). The fleet's good config is
    validated, swapped in and proven by starting Apache on it."""
    sh(lab, f"apache2ctl stop; sleep 1; echo 'Listen 22' >> {HARDENING}")
    out = await reconcile(lab, repo)
    assert out.status == APPLIED, out.error
    assert out.result is not None
    text = "\n".join(out.result.messages)
    assert "does not start on its live configuration either" in text, text
    start = next(o for o in out.result.outcomes if o.action.kind is ActionKind.START_SERVICE)
    assert start.status == "done" and "started on the new configuration" in start.message, start
    assert "Listen 22" not in sh(lab, f"cat {HARDENING}")
    assert apache_pid(lab) and http_code(lab) != "000"
    again = await reconcile(lab, repo)
    assert again.status in (IN_SYNC, APPLIED), again.error
