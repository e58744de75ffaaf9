"""What an operator sees (#19): the status pages in a real headless browser (Debian's chromium
driven by chromedriver), against a real `reconciler run` on the lab with the example fleet (lab
variant: tunnel-mode IPsec over strongSwan's userspace ESP), signed pushes, aiosmtpd.

The daemon converges the fleet, the hosts' public keys are collected and pushed, the mesh comes
up and every pair is verified live; then a hand edit on web1 is the only drift any host reports
(the reconciler's own changes are "applied" events, never drift); the pages show it all; the
overview and a host page are kept as screenshots (RECONCILER_SCREENSHOTS=DIR writes them there:
docs/ keeps the ones the README shows).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from reconciler.domains.render import render_host
from reconciler.fleet.load import load_fleet
from reconciler.lab import specs_from_fleet
from tests.e2e.test_daemon import EXAMPLE, Inbox, World, free_port, get_json, git, wait_converged, wait_ready
from tests.e2e.webdriver import Browser, browser_missing

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

MESH_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def op(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("operator")
    work = tmp / "work"
    shutil.copytree(EXAMPLE, work)
    fleet_yaml = work / "fleet.yaml"  # no IP-IP, no kernel ESP here: tunnel mode over libipsec
    text = fleet_yaml.read_text()
    fleet_yaml.write_text(
        text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    )
    fleet = load_fleet(work)
    lab = lab_factory(specs_from_fleet(fleet), lock_timeout=1800)
    key = tmp / "admin_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(key)], check=True)
    kt, blob = (tmp / "admin_key.pub").read_text().split()[:2]
    allowed = tmp / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {kt} {blob}\n')
    remote = tmp / "fleet.git"
    git(tmp, "init", "-q", "--bare", "-b", "main", str(remote))
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", str(remote))
    inbox = Inbox()
    smtp_port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    w = World(tmp, lab, work, remote, key, allowed, inbox, smtp_port, free_port(), tmp / "state")
    w.commit("example fleet, lab variant")
    w.push()
    try:
        yield w
    finally:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        controller.stop()
        lab.down()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


def collect_keys(w: World) -> None:
    """What `reconciler keys collect` does, through the lab: each host's public key into keys/."""
    fleet = load_fleet(w.work)
    for host in fleet.hosts:
        kp = render_host(fleet, host).keypairs[0]
        res = w.lab.exec(host.name, ["cat", kp.public_path])
        assert res.returncode == 0, res.stderr
        (w.work / "keys" / f"{host.name}.pub").write_bytes(res.stdout)


async def mesh_links(w: World) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = (await get_json(w))["mesh"]["links"]
    return links


async def wait_mesh_up(w: World) -> list[dict[str, Any]]:
    """Every pair up by the daemon's own verify after apply. A pair whose first attempt met a
    peer that had not loaded its keys yet comes up on a later reconcile: a motd push makes
    one (and its verify) if the first round is not all green."""
    deadline = time.monotonic() + MESH_TIMEOUT
    nudged = 0
    links: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        links = await mesh_links(w)
        if links and all(link["state"] == "up" for link in links):
            return links
        if time.monotonic() > deadline - MESH_TIMEOUT + 60 * (nudged + 1) and nudged < 2:
            nudged += 1
            (w.work / "templates" / "motd.j2").write_text(
                (w.work / "templates" / "motd.j2").read_text() + f"\n{{# nudge {nudged} #}}\n"
            )
            head = w.commit(f"motd: reconcile again ({nudged})")
            w.push()
            await wait_converged(w, head)
        await asyncio.sleep(1)
    raise AssertionError(f"mesh not up: {links}\n" + w.all_logs()[-3000:])


async def test_converge_collect_keys_mesh_verified(op: World) -> None:
    head = git(op.work, "rev-parse", "HEAD")
    op.start()
    await wait_ready(op)
    await wait_converged(op, head)
    links = await mesh_links(op)
    assert links and {link["state"] for link in links} == {"pending-keys"}, links  # no key collected yet
    collect_keys(op)
    keyed = op.commit("keys: public keys collected from the hosts")
    op.push()
    await wait_converged(op, keyed)
    links = await wait_mesh_up(op)
    n = len(load_fleet(op.work).hosts)
    assert len(links) == n * (n - 1) // 2


async def test_only_the_hand_edit_is_drift(op: World) -> None:
    """Right after converging (keys pushed, the mesh up, every host changed by the fleet), a drift
    scan of every host finds nothing; a hand edit on web1 is web1's drift only."""
    before = {h["name"]: h["drift_count"] for h in (await get_json(op))["hosts"]}
    scans_before = await metric(op, "reconciler_drift_scans_total")
    # two full drift rounds (8 s period) see every host's changes made by the fleet
    deadline = time.monotonic() + 120
    while await metric(op, "reconciler_drift_scans_total") < scans_before + 2 * len(before):
        assert time.monotonic() < deadline, "drift scans do not run"
        await asyncio.sleep(1)
    status = await get_json(op)
    assert {h["name"]: h["drift_count"] for h in status["hosts"]} == before == dict.fromkeys(before, 0), (
        status
    )
    assert not [e for e in status["events"] if e["kind"] == "drift"], status["events"]
    assert [e for e in status["events"] if e["kind"] == "applied"]  # the fleet's changes, named so
    op.lab.exec("web1", ["sh", "-c", "echo 'hand edit' >> /etc/motd"])
    deadline = time.monotonic() + 120
    while True:
        status = await get_json(op)
        drifted = {h["name"]: h["drift_count"] for h in status["hosts"] if h["drift_count"]}
        if drifted:
            break
        assert time.monotonic() < deadline, "the hand edit was not found"
        await asyncio.sleep(0.5)
    assert drifted == {"web1": 1}, status["hosts"]
    drift_events = [e for e in status["events"] if e["kind"] == "drift"]
    assert [e["host"] for e in drift_events] == ["web1"] and "/etc/motd" in drift_events[0]["message"]
    assert await metric(op, "reconciler_drift_events_total", host="web1") == 1.0
    assert await metric(op, "reconciler_drift_events_total", host="web2") == 0.0


async def metric(w: World, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(w.base + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_pages_in_a_headless_browser(op: World, browser: Browser) -> None:
    status = await get_json(op)
    hosts = [h["name"] for h in status["hosts"]]
    shots = Path(os.environ.get("RECONCILER_SCREENSHOTS") or op.tmp)

    browser.get(op.base + "/")
    assert browser.title() == "reconciler"
    assert set(browser.attributes("svg#mesh g.host", "data-host")) == set(hosts)
    states = browser.attributes("svg#mesh line.link", "data-state")
    assert states and set(states) == {"up"}, states
    legend = " ".join(browser.texts("#mesh-legend span"))
    assert f"up: {len(states)}" in legend and "down: 0" in legend
    rows = browser.texts("table#hosts tr")[1:]
    assert len(rows) == len(hosts) and all("Ready" in r for r in rows), rows
    assert any(r.startswith("web1") and " 1 (last" in r for r in rows), rows
    assert browser.screenshot(shots / "status-overview.png") > 10_000

    browser.click('svg#mesh a[href="/hosts/web1"]')  # the picture links to the host page
    assert browser.current_url().endswith("/hosts/web1")
    assert "Ready" in browser.texts("#state")[0]
    commits = " ".join(browser.texts("table#commits td"))
    assert "motd: reconcile again" in commits or "keys: public keys collected" in commits, commits
    assert "signed by ops@example.com" in commits, commits
    assert browser.texts("#plan-summary")[0].startswith("applied ")
    assert browser.texts("ul#plan li")  # what the last apply did, with its diffs
    verify = browser.texts("#verify-summary")[0]
    assert verify.startswith("passed") and " 0 fail" in verify, verify
    assert any("pass" in row for row in browser.texts("table#verify tr")[1:])
    drift_rows = browser.texts("table#drift tr")[1:]
    assert len(drift_rows) == 1 and "/etc/motd" in drift_rows[0], drift_rows
    assert "web1" in browser.texts("#mail")[0]  # the drift mail's subject
    assert browser.screenshot(shots / "status-host.png") > 10_000

    browser.get(op.base + "/commits")
    running = browser.texts("table#running tr")[1:]
    assert len(running) == 1 and all(h in running[0] for h in hosts), running
    assert browser.texts("table#rejected td") == ["none"]

    browser.get(op.base + "/hosts/nosuchhost")
    assert "no such host" in browser.source()
    console = [m for m in browser.console() if "Content Security Policy" in m or "Refused" in m]
    assert not console, console  # nothing on the pages needs more than the strict policy
