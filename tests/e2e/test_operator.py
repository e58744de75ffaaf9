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
from prometheus_client.parser import text_string_to_metric_families

from reconciler.fleet.load import load_fleet
from tests.e2e.harness import (
    World,
    collect_keys,
    free_port,
    get_json,
    git,
    lab_world,
    mesh_links,
    wait_converged,
    wait_mesh_up,
    wait_ready,
)
from tests.e2e.webdriver import Browser, browser_missing

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def op(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # no IP-IP, no kernel ESP here: tunnel mode over libipsec
    tmp = tmp_path_factory.mktemp("operator")
    with lab_world(lab_factory, tmp, libipsec=True, first_commit="example fleet, lab variant") as w:
        yield w


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
    if (op.state / "history").exists():  # what the scans recorded, for a failure's reader
        print("\n/etc history:\n" + git(op.state / "history", "log", "--all", "--format=%h %s%n%b")[:6000])
    print("events:", [(e["kind"], e["host"], e["message"]) for e in status["events"]])
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


# ---------------------------------------------------------------- the image (marker: container)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/reconciler:e2e"
UID = 10001  # the image's user
GRACE = 20


def podman_env() -> dict[str, str]:
    """podman settings for the cached base (scripts/container-base.sh --env)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "container-base.sh"), "--env"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    env = dict(os.environ)
    for word in out.replace("export ", "").split():
        key, _, value = word.partition("=")
        env[key] = value
    return env


def podman(env: dict[str, str], *args: str, check: bool = True, timeout: float = 900) -> str:
    res = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:3])}: {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        )
    return res.stdout.strip()


def owned_copy(src: Path, dest: Path, mode: int = 0o600) -> Path:
    shutil.copy(src, dest)
    os.chown(dest, UID, UID)
    dest.chmod(mode)
    return dest


@pytest.fixture
def container_env() -> dict[str, str]:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (Debian packages podman, buildah, runc: scripts/install.sh)")
    env = podman_env()
    started = time.monotonic()
    base = subprocess.run(["bash", str(ROOT / "scripts" / "container-base.sh")], env=env, check=True,
                          capture_output=True, text=True, timeout=1800).stdout.strip()  # fmt: skip
    print(f"\nbase image {base} ready in {time.monotonic() - started:.1f}s")
    env["RECONCILER_BASE_IMAGE"] = base
    return env


@pytest.mark.container
async def test_the_image_runs_against_the_lab(op: World, container_env: dict[str, str]) -> None:
    """The Dockerfile built with podman (base: the cached debootstrap image) runs with host
    networking against the lab and the fleet repo: healthy by its HEALTHCHECK, converges every
    host on a pushed commit, stops on SIGTERM within the grace period with exit code 0."""
    env = container_env
    started = time.monotonic()
    podman(env, "build", "--format", "docker", "--network=host", "--pull=never", "-q",
           "--build-arg", f"BASE={env['RECONCILER_BASE_IMAGE']}",
           "--build-arg", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-t", IMAGE, str(ROOT))  # fmt: skip
    print(f"image built in {time.monotonic() - started:.1f}s")
    if op.proc is not None:
        assert op.stop() == 0  # the host's daemon hands the fleet to the container

    box = op.tmp / "container"
    for sub in ("state", "history", "ssh"):
        (box / sub).mkdir(parents=True)
        os.chown(box / sub, UID, UID)
    (box / "ssh").chmod(0o700)
    info = op.lab.info
    owned_copy(Path(info.known_hosts), box / "ssh" / "known_hosts", 0o644)
    owned_copy(Path(info.client_key), box / "ssh" / "id")
    owned_copy(op.allowed_signers, box / "ssh" / "allowed_signers", 0o644)
    remote = op.remote  # root's: the daemon trusts exactly this path for reading (safe.directory)
    token = "container-read-canary-5e1f"  # noqa: S105 (a test value)
    port = free_port()
    name = f"reconciler-e2e-{os.getpid()}"
    podman(env, "run", "-d", "--name", name, "--network=host",
           "-v", f"{box / 'state'}:/var/lib/reconciler",
           "-v", f"{box / 'history'}:/var/lib/reconciler-history",
           "-v", f"{box / 'ssh'}:/etc/reconciler-ssh:ro", "-v", f"{remote}:/srv/fleet.git:ro",
           "-e", "RECONCILER_SOURCE_URL=file:///srv/fleet.git", "-e", "RECONCILER_SOURCE_POLL_INTERVAL=2s",
           "-e", "RECONCILER_SOURCE_VERIFY=ssh",
           "-e", "RECONCILER_SOURCE_ALLOWED_SIGNERS=/etc/reconciler-ssh/allowed_signers",
           "-e", "RECONCILER_SSH_KNOWN_HOSTS=/etc/reconciler-ssh/known_hosts",
           "-e", "RECONCILER_SSH_IDENTITY=/etc/reconciler-ssh/id",
           "-e", "RECONCILER_SERVER_LISTEN=127.0.0.1", "-e", f"RECONCILER_SERVER_PORT={port}",
           "-e", f"RECONCILER_SERVER_READ_TOKEN={token}", "-e", f"RECONCILER_SHUTDOWN_GRACE={GRACE}s",
           IMAGE)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run(["podman", "healthcheck", "run", name], env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline, podman(env, "logs", name, check=False)[-3000:]
            await asyncio.sleep(1)
        assert podman(env, "inspect", "--format", "{{.State.Health.Status}}", name) == "healthy"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/status") as r:
                assert r.status == 401  # the read token holds in the image too

            async def converged(commit: str) -> bool:
                async with s.get(base + "/status", headers=auth) as r:
                    hosts = (await r.json())["hosts"]
                return bool(hosts) and all(
                    h["state"] == "Ready" and h["applied_commit"] == commit for h in hosts
                )

            motd = op.work / "templates" / "motd.j2"
            motd.write_text(motd.read_text() + "\nNote: served by the container\n")
            head = op.commit("motd: from the container")
            op.push()
            deadline = time.monotonic() + 240
            while not await converged(head):
                assert time.monotonic() < deadline, podman(env, "logs", name, check=False)[-4000:]
                await asyncio.sleep(1)
        for host in ("web1", "db2"):
            assert "served by the container" in op.lab.exec(host, ["cat", "/etc/motd"]).stdout.decode()
        t0 = time.monotonic()
        podman(env, "stop", "-t", str(GRACE + 10), name)
        stopped_in = time.monotonic() - t0
        code = podman(env, "inspect", "--format", "{{.State.ExitCode}}", name)
        print(f"container stopped in {stopped_in:.1f}s, exit code {code}")
        assert code == "0" and stopped_in < GRACE, (code, stopped_in)
    finally:
        podman(env, "rm", "-f", "-t", "0", name, check=False)
