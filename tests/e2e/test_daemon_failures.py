"""End to end: failures that stop. A real `reconciler run` process, signed pushes to a bare
remote, aiosmtpd, lab hosts (web1, db1 of the example fleet).

- A site on ``port: 22`` (passes validate and ``apache2ctl -t``; the graceful reload kills the
  master): one apply, Apache restored AND serving the old config (a real HTTP request
  answered), web1 Stalled with ``reload-broke-service`` for that commit, ONE mail, no retry
  loop (the daemon keeps fetching and drift-scanning, but applies nothing more).
- A firewall change that cuts management SSH (``management_sources`` without the daemon's
  address: render cannot know it): ONE rollback by the dead-man switch per host, Stalled with
  ``firewall-rolled-back``, ONE mail per host; port 22 probed every second meanwhile.
- A new commit clears each stall.
- A host deleted from the fleet stays in /status and metrics as Removed until
  ``reconciler sync --forget``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import World, get_json, git, lab_world, send_webhook, wait_converged, wait_ready

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

HOSTS = ("db1", "web1")
STALL_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def fw(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # two hosts are enough: a web host and a db host
    with lab_world(lab_factory, tmp_path_factory.mktemp("e2e-failures"), drop_hosts=("db2", "web2")) as w:
        yield w


def address(w: World, host: str) -> str:
    return next(h.address for h in w.lab.info.hosts if h.name == host)


def http_code(w: World, host: str = "web1") -> str:
    res = subprocess.run(
        ["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: shop.example.com",
         f"http://{address(w, host)}/"],
        capture_output=True, check=False, timeout=10,
    )  # fmt: skip
    return res.stdout.decode().strip() or "000"


def apache_master(w: World) -> str:
    res = w.lab.exec(
        "web1", ["sh", "-c", 'p=$(cat /var/run/apache2/apache2.pid) && kill -0 "$p" && echo "$p"']
    )
    return res.stdout.decode().strip()


def ssh_open(w: World, host: str) -> bool:
    """A NEW TCP connection to the host's port 22 from the machine (the daemon's address)."""
    try:
        with socket.create_connection((address(w, host), 22), timeout=1.0) as s:
            s.settimeout(1.0)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


async def metric_values(w: World, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family from /metrics, parsed by prometheus_client's own
    parser; labels as ``{a="x",b="y"}`` sorted by name (the exposition's order is the client's)."""
    async with aiohttp.ClientSession() as s, s.get(w.base + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out["{" + labels + "}" if labels else ""] = sample.value
    return out


async def host_row(w: World, host: str) -> dict[str, Any]:
    return next(h for h in (await get_json(w))["hosts"] if h["name"] == host)


async def wait_stalled(w: World, hosts: tuple[str, ...], commit: str, code: str) -> dict[str, Any]:
    deadline = time.monotonic() + STALL_TIMEOUT
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await get_json(w)
        rows = {h["name"]: h for h in status["hosts"]}
        if all(
            rows[h]["state"] == "Stalled"
            and rows[h]["code"] == code
            and rows[h]["attempted_commit"] == commit
            for h in hosts
        ):
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"not stalled with {code} on {commit}: {status.get('hosts')}\n{w.all_logs()[-3000:]}"
    )


def subjects(w: World) -> list[str]:
    """Every subject, unfolded (a long subject spans header lines)."""
    return [
        str(email.message_from_bytes(data, policy=email.policy.default)["subject"])
        for _, data in w.inbox.messages
    ]


def stall_mails(w: World, host: str, commit: str) -> list[str]:
    return [s for s in subjects(w) if f"{host} stalled on commit {commit[:12]}" in s]


async def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_start_converges(fw: World) -> None:
    head = git(fw.work, "rev-parse", "HEAD")
    fw.start()
    await wait_ready(fw)
    await wait_converged(fw, head)
    assert http_code(fw) != "000"


async def test_apache_broken_at_reload_serves_the_old_config_and_stalls_once(fw: World) -> None:
    site = fw.work / "sites" / "shop.yaml"
    original = site.read_text()
    site.write_text(original + "port: 22\n")
    try:
        await _apache_broken_at_reload(fw)
    finally:
        site.write_text(original)  # the next test commits the fix, even after a failure here


async def _apache_broken_at_reload(fw: World) -> None:
    bad = fw.commit("shop on port 22")
    fw.push()
    assert await send_webhook(fw, "port-22") == 202
    status = await wait_stalled(fw, ("web1",), bad, "reload-broke-service")
    web1 = next(h for h in status["hosts"] if h["name"] == "web1")
    assert "files were restored" in web1["reason"] and web1["waiting_for_new_commit"] is True, web1

    async def db1_ready() -> bool:  # one stalled host stops no other (db1 may still be applying)
        db1 = await host_row(fw, "db1")
        return bool(db1["state"] == "Ready" and db1["applied_commit"] == bad)

    await wait_for(db1_ready, "db1 Ready on the bad commit", timeout=STALL_TIMEOUT)
    # Apache serves the OLD configuration: a real request answered, the site file as before
    assert http_code(fw) != "000"
    assert (
        "VirtualHost *:80"
        in fw.lab.exec("web1", ["cat", "/etc/apache2/sites-available/shop.conf"]).stdout.decode()
    )
    master = apache_master(fw)
    assert master
    # No retry loop: over a window with polls (every 2 s) and a drift tick (8 s), the daemon
    # fetches and drift-scans web1 (positive evidence it kept looking) but applies nothing.
    failures0 = await metric_values(fw, "reconciler_host_failures_total")
    fetches0 = sum((await metric_values(fw, "reconciler_source_fetches_total")).values())
    scans0 = sum((await metric_values(fw, "reconciler_drift_scans_total")).values())

    async def looked_again() -> bool:
        fetches = sum((await metric_values(fw, "reconciler_source_fetches_total")).values())
        scans = sum((await metric_values(fw, "reconciler_drift_scans_total")).values())
        return fetches >= fetches0 + 3 and scans >= scans0 + 2

    await wait_for(looked_again, "more fetches and a drift scan of both hosts", timeout=40)
    assert await metric_values(fw, "reconciler_host_failures_total") == failures0
    assert failures0['{class="terminal",reason="reload-broke-service"}'] == 1, failures0
    assert (await metric_values(fw, "reconciler_stalls_total"))['{reason="reload-broke-service"}'] == 1
    assert apache_master(fw) == master  # never restarted again
    assert http_code(fw) != "000"
    web1 = await host_row(fw, "web1")
    assert web1["state"] == "Stalled" and web1["attempted_commit"] == bad
    stalled = [e for e in (await get_json(fw))["events"] if e["kind"] == "stalled" and e["host"] == "web1"]
    assert len(stalled) == 1 and stalled[0]["commit"] == bad, stalled
    # ONE mail, naming host, commit and reason
    await wait_for(lambda: _true(len(stall_mails(fw, "web1", bad)) >= 1), "the stall mail", timeout=30)
    mails = stall_mails(fw, "web1", bad)
    assert len(mails) == 1 and "reload-broke-service" in mails[0], subjects(fw)


async def _true(value: bool) -> bool:
    return value


async def test_new_commit_clears_the_apache_stall(fw: World) -> None:
    head = fw.commit("shop back on port 80")
    fw.push()
    assert await send_webhook(fw, "port-80") == 202
    await wait_converged(fw, head)
    web1 = await host_row(fw, "web1")
    assert web1["code"] == "" and web1["waiting_for_new_commit"] is False
    assert http_code(fw) != "000"


async def test_lockout_is_rolled_back_once_stalls_and_mails_once(fw: World) -> None:
    fleet_file = fw.work / "fleet.yaml"
    original = fleet_file.read_text()
    try:
        await _lockout(fw, fleet_file, original)
    finally:
        fleet_file.write_text(original)  # the next test's commit carries the fix, even after a failure


async def _lockout(fw: World, fleet_file: Any, original: str) -> None:
    # the daemon connects from 192.0.2.254: without it, management SSH is cut (render admits
    # SSH from the declared sources, it cannot know where the daemon connects from)
    fleet_file.write_text(original.replace("[192.0.2.254/32, 198.51.100.0/24]", "[198.51.100.0/24]"))
    assert fleet_file.read_text() != original
    bad = fw.commit("management SSH only from 198.51.100.0/24")
    probes: dict[str, list[tuple[float, bool]]] = {h: [] for h in HOSTS}
    stop = asyncio.Event()

    async def prober() -> None:
        while not stop.is_set():
            t = time.monotonic()
            opened = await asyncio.gather(*(asyncio.to_thread(ssh_open, fw, h) for h in HOSTS))
            for h, ok in zip(HOSTS, opened, strict=True):
                probes[h].append((t, ok))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))

    task = asyncio.create_task(prober())
    try:
        fw.push()
        assert await send_webhook(fw, "lockout") == 202
        await wait_stalled(fw, HOSTS, bad, "firewall-rolled-back")
        stalled_at = time.monotonic()
        scans0 = sum((await metric_values(fw, "reconciler_drift_scans_total")).values())
        fetches0 = sum((await metric_values(fw, "reconciler_source_fetches_total")).values())

        async def looked_again() -> bool:
            fetches = sum((await metric_values(fw, "reconciler_source_fetches_total")).values())
            scans = sum((await metric_values(fw, "reconciler_drift_scans_total")).values())
            return fetches >= fetches0 + 3 and scans >= scans0 + 2

        await wait_for(looked_again, "more fetches and drift scans after the stall", timeout=40)
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - stalled_at)))  # >= 20 s of probes after
    finally:
        stop.set()
        await task
    for h in HOSTS:
        closed = [t for t, ok in probes[h] if not ok]
        print(f"\n{h}: port 22 closed in {len(closed)} of {len(probes[h])} one-second probes")
        assert closed, f"{h}: the cut was never seen (the change did not load?)"
        # one rollback: the closed probes form ONE window no longer than the dead-man window
        assert closed[-1] - closed[0] <= 10 + 4, closed
        assert len(closed) <= 14
        assert all(ok for t, ok in probes[h] if t > closed[-1])  # open ever since
        assert sum(1 for t, ok in probes[h] if t > closed[-1]) >= 20
    failures = await metric_values(fw, "reconciler_host_failures_total")
    assert failures['{class="terminal",reason="firewall-rolled-back"}'] == len(HOSTS), failures
    for h in HOSTS:
        await wait_for(lambda h=h: _true(len(stall_mails(fw, h, bad)) >= 1), f"{h}'s stall mail", timeout=30)
        mails = stall_mails(fw, h, bad)
        assert len(mails) == 1 and "firewall-rolled-back" in mails[0], subjects(fw)
        row = await host_row(fw, h)
        assert row["state"] == "Stalled" and "rolled back" in row["reason"], row
    # the hosts run the old rules (the daemon's address admitted), the persistent file untouched
    saved = fw.lab.exec("web1", ["cat", "/etc/iptables/rules.v4"]).stdout.decode()
    assert "192.0.2.254/32" in saved
    # a new commit clears the stall
    fleet_file.write_text(original)
    head = fw.commit("management SSH back")
    fw.push()
    assert await send_webhook(fw, "lockout-fixed") == 202
    await wait_converged(fw, head)


async def test_removed_host_is_shown_until_forgotten(fw: World) -> None:
    (fw.work / "hosts" / "db1.yaml").unlink()
    head = fw.commit("db1 leaves the fleet")
    fw.push()
    assert await send_webhook(fw, "db1-gone") == 202

    async def removed() -> bool:
        rows = {h["name"]: h for h in (await get_json(fw))["hosts"]}
        return bool(rows.get("db1", {}).get("state") == "Removed" and rows["web1"]["applied_commit"] == head)

    await wait_for(removed, "db1 Removed and web1 on the new commit", timeout=STALL_TIMEOUT)
    db1 = await host_row(fw, "db1")
    assert db1["removed_commit"] == head and "removed from the fleet" in db1["reason"], db1
    assert (await metric_values(fw, "reconciler_hosts"))['{state="Removed"}'] == 1
    # a restart keeps showing it
    assert fw.stop() == 0
    fw.start()
    await wait_ready(fw)
    assert (await host_row(fw, "db1"))["state"] == "Removed"
    env = fw.env()

    def forget(name: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", "sync", "--forget", name],
            env=env,
            capture_output=True,
            timeout=30,
        )

    refused = forget("web1")  # still in the fleet: never dropped
    assert refused.returncode == 1 and b"409" in refused.stderr, refused
    ok = forget("db1")
    assert ok.returncode == 0 and b"forgotten: db1" in ok.stdout, ok
    names = [h["name"] for h in (await get_json(fw))["hosts"]]
    assert names == ["web1"]
    assert (await metric_values(fw, "reconciler_hosts"))['{state="Removed"}'] == 0
    assert fw.stop() == 0
