"""End to end: a real `reconciler run` process, a bare git remote, lab hosts and aiosmtpd.

One daemon (and one lab) for the module; tests run in order and each starts from the state the
previous one left. Pushes are SSH-signed with a real key; the daemon verifies them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from reconciler.domains.render import render_host
from reconciler.fleet.load import load_fleet
from tests.e2e.harness import (
    DRIFT_PERIOD,
    FETCHED,
    GIT_ENV,
    SYNC_TOKEN,
    WEBHOOK_SECRET,
    World,
    collect_keys,
    get_json,
    git,
    lab_world,
    mesh_links,
    metric,
    run_keys_collect,
    send_webhook,
    wait_converged,
    wait_fetches,
    wait_mesh_up,
    wait_ready,
    webhook_headers,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def world(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The example fleet as this kernel runs it (tunnel-mode IPsec over libipsec: no IP-IP, no
    kernel ESP here), its four hosts in a lab."""
    with lab_world(lab_factory, tmp_path_factory.mktemp("e2e"), libipsec=True) as w:
        yield w


async def reconciles(w: World) -> float:
    """All host reconciles so far, whatever their result."""
    async with aiohttp.ClientSession() as s, s.get(w.base + "/metrics") as r:
        text = await r.text()
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("reconciler_reconciles_total{")
    )


def motd(w: World, host: str) -> str:
    return w.lab.exec(host, ["cat", "/etc/motd"]).stdout.decode(errors="replace")


def set_motd_line(w: World, text: str) -> None:
    tpl = w.work / "templates" / "motd.j2"
    lines = tpl.read_text().splitlines()
    lines = [ln for ln in lines if not ln.startswith("Note:")] + [f"Note: {text}"]
    tpl.write_text("\n".join(lines) + "\n")


async def test_first_start_converges_the_lab(world: World) -> None:
    head = git(world.work, "rev-parse", "HEAD")
    t0 = time.monotonic()
    world.start()
    await wait_ready(world)
    status = await wait_converged(world, head)
    elapsed = time.monotonic() - t0
    print(f"\nfirst converge of {len(status['hosts'])} hosts: {elapsed:.2f}s")
    assert status["source"]["good"] == head and status["source"]["rejection"] is None
    assert "managed by reconciler" in motd(world, "web1")


# what the daemon's verify proves for every (host, peer) pair of the libipsec mesh, by name
PAIR_CHECKS = ("firewall", "ipsec.config", "ipsec.keys", "ipsec.ike", "ipsec.child", "ipsec.log")
HOST_CHECKS = ("ipsec.daemon",)
PROBE_CHECKS = ("datapath", "firewall.reach")  # the ping + capture + connect probe


def apparmor_lsm_active() -> bool:
    """This kernel's AppArmor LSM (the lab hosts share it), probed as verify probes it."""
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


# the one kind of skip allowed besides the probe's: a kernel feature probed and found missing
KERNEL_SKIPS = () if apparmor_lsm_active() else ("the AppArmor LSM is not active on this kernel",)


async def verified_on(w: World, commit: str, timeout: float = 90) -> dict[str, dict[str, Any]]:
    """Every host's verify after apply on ``commit`` (waits for the batch to finish)."""
    deadline = time.monotonic() + timeout
    verify: dict[str, Any] = {}
    while time.monotonic() < deadline:
        verify = (await get_json(w))["verify"]
        if len(verify) == 4 and all(v["commit"] == commit for v in verify.values()):
            return verify
        await asyncio.sleep(0.2)
    raise AssertionError(f"no verify of every host on {commit[:12]}: {json.dumps(verify)[:3000]}")


def assert_all_passed(host: str, v: dict[str, Any], peers: list[str], *, probe: bool) -> list[str]:
    """Every check that ran passed, each named check for each peer ran; the probe's checks ran
    (``probe``) or were skipped saying why; any other skip is a kernel feature found missing.
    Returns the names of those kernel-feature skips."""
    assert v["ok"] is True and v["failed"] == [] and v["counts"]["fail"] == 0, (host, v["failed"])
    by = {(c["name"], c["peer"] or ""): c for c in v["checks"]}
    for name in HOST_CHECKS:
        assert by[(name, "")]["status"] == "pass", (host, by.get((name, "")))
    for peer in peers:
        for name in PAIR_CHECKS + (PROBE_CHECKS if probe else ()):
            assert by[(name, peer)]["status"] == "pass", (host, peer, by.get((name, peer)))
        if not probe:  # not run after a motd-only apply: skipped, saying why
            for name in PROBE_CHECKS:
                check = by[(name, peer)]
                assert check["status"] == "skip" and "not run after this apply" in check["cause"], check
    others = [c for c in v["checks"] if c["status"] == "skip" and c["name"] not in PROBE_CHECKS]
    for c in others:
        assert c["name"].startswith("apparmor.") and any(k in c["cause"] for k in KERNEL_SKIPS), (host, c)
    assert v["counts"]["pass"] == sum(c["status"] == "pass" for c in v["checks"]) > 0
    return sorted({f"{c['name']}: {c['cause'][:60]}" for c in others})


async def refuses_a_private_key_served_as_public(w: World, host: str) -> None:
    """A hostile (or broken) host serves its PRIVATE key where its public key belongs: `keys
    collect` refuses it by name, writes nothing into the repo and never prints the key."""
    fleet = load_fleet(w.work)
    kp = render_host(fleet, next(h for h in fleet.hosts if h.name == host)).keypairs[0]
    public = w.lab.exec(host, ["cat", kp.public_path])
    private = w.lab.exec(host, ["cat", kp.private_path])
    assert public.returncode == 0 and private.returncode == 0 and b"PRIVATE KEY" in private.stdout
    assert w.lab.exec(host, ["cp", kp.private_path, kp.public_path]).returncode == 0
    try:
        res = run_keys_collect(w, host)
    finally:  # the host's own public key back, byte for byte
        put = w.lab.exec(host, ["sh", "-c", 'cat > "$1"', "sh", kp.public_path], input=public.stdout)
        assert put.returncode == 0, put.stderr
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 1 and "looks like a PRIVATE key" in out and host in out, out
    assert not (w.work / "keys" / f"{host}.pub").exists()
    body = [ln for ln in private.stdout.decode().splitlines() if ln and not ln.startswith("-----")]
    assert body and not any(ln in out for ln in body)  # no line of the key in the output
    assert w.lab.exec(host, ["cat", kp.public_path]).stdout == public.stdout


async def test_collected_keys_bring_the_mesh_up(world: World) -> None:
    """The admin's path to a mesh: the first converge made each host's key pair (no peer is
    configured yet: every link waits for keys); `reconciler keys collect` reads the public keys
    back into the repo, a signed commit of them is pushed, the daemon applies it and its own
    verify after apply proves every pair up. Then a firewall change on every host (a port
    opened) makes the daemon verify with the datapath probe: ESP over the mesh, every pair."""
    links = await mesh_links(world)
    assert links and {link["state"] for link in links} == {"pending-keys"}, links
    await refuses_a_private_key_served_as_public(world, "web2")
    out = collect_keys(world)
    assert out.count("wrote keys/") == 4, out
    keyed = world.commit("keys: public keys collected from the hosts")
    world.push()
    assert await send_webhook(world, "keys-1") == 202
    await wait_converged(world, keyed)
    links = await wait_mesh_up(world)
    assert len(links) == 6 and {link["state"] for link in links} == {"up"}, links
    for role in ("web", "db"):
        path = world.work / "roles" / f"{role}.yaml"
        path.write_text(
            path.read_text().replace("ports:\n", "ports:\n  - {name: extra, port: 8444, protocol: tcp}\n")
        )
    head = world.commit("open port 8444 on every host")
    world.push()
    assert await send_webhook(world, "port-1") == 202
    await wait_converged(world, head)
    verify = await verified_on(world, head)
    assert sorted(verify) == ["db1", "db2", "web1", "web2"], verify
    for host, v in verify.items():
        assert v["datapath_probe"] is True, (host, v)
        skipped = assert_all_passed(host, v, sorted(set(verify) - {host}), probe=True)
        print(f"\n{host} verified with the probe: {v['counts']}, kernel-feature skips: {skipped}")
    assert "--dport 8444" in world.lab.exec("db1", ["iptables-save"]).stdout.decode()


async def test_push_and_webhook_converges(world: World) -> None:
    timings = []
    for i in range(3):
        set_motd_line(world, f"webhook push {i}")
        head = world.commit(f"motd via webhook {i}")
        t0 = time.monotonic()
        world.push()
        assert await send_webhook(world, f"push-{i}") == 202
        await wait_converged(world, head)
        timings.append(time.monotonic() - t0)
        assert f"webhook push {i}" in motd(world, "web1")
    print(f"\npush-to-converged via webhook (warm, 4 hosts): {[round(t, 2) for t in timings]}, "
          f"median {statistics.median(timings):.2f}s")  # fmt: skip
    # the documented histogram saw these three convergences (docs/DEPLOY.md)
    assert await metric(world, "reconciler_commit_to_converged_seconds_count") >= 3


async def test_applied_hosts_are_verified_live_in_one_batch(world: World) -> None:
    """After the pushes above, the daemon proved the applied hosts live (reconciler.verify), all
    of them in one batch, without the ping probe (a motd change cannot change the mesh), and
    shows the results in /status and /metrics: with the keys collected and the mesh up, every
    check that ran passed."""
    head = git(world.work, "rev-parse", "HEAD")
    verify = await verified_on(world, head, timeout=60)
    assert sorted(verify) == ["db1", "db2", "web1", "web2"], verify
    for host, v in verify.items():
        assert v["commit"] == head and v["batch_hosts"] == 4 and v["datapath_probe"] is False
        skipped = assert_all_passed(host, v, sorted(set(verify) - {host}), probe=False)
        print(f"\n{host}: {v['counts']}, kernel-feature skips: {skipped}")
    async with aiohttp.ClientSession() as s, s.get(world.base + "/metrics") as r:
        text = await r.text()
    assert 'reconciler_verify_checks{host="web1",status="pass"}' in text
    assert 'reconciler_verify_checks{host="web1",status="fail"} 0.0' in text
    assert "reconciler_verify_runs_total{" in text


async def test_push_without_webhook_converges_by_polling(world: World) -> None:
    set_motd_line(world, "polled push")
    head = world.commit("motd via polling")
    t0 = time.monotonic()
    world.push()
    await wait_converged(world, head)
    print(f"\npush-to-converged via polling (poll 2s): {time.monotonic() - t0:.2f}s")
    assert "polled push" in motd(world, "db1")


async def test_forged_webhook_is_401(world: World) -> None:
    body = b'{"ref": "refs/heads/main"}'
    headers = webhook_headers(body, "forged")
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    async with aiohttp.ClientSession() as s:
        async with s.post(world.base + "/hooks/github", data=body, headers=headers) as r:
            assert r.status == 401


async def _wait_refusals(world: World, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(world.inbox.refusals()) < count:
        await asyncio.sleep(0.1)


async def test_invalid_fleet_push_changes_nothing_and_mails_once(world: World) -> None:
    good = (await get_json(world))["source"]["good"]
    before = motd(world, "web1")
    mails = len(world.inbox.refusals())
    host_file = world.work / "hosts" / "web2.yaml"
    original = host_file.read_text()
    host_file.write_text(original.replace("public_address:", "public_adress:"))
    bad = world.commit("typo in a host file")
    world.push()
    assert await send_webhook(world, "invalid-1") == 202
    await _wait_refusals(world, mails + 1)
    await wait_fetches(world, 2)  # more polls of the same refused head: still one mail
    status = await get_json(world)
    assert status["source"]["good"] == good and status["source"]["head"] == bad
    rejection = status["source"]["rejection"]
    assert rejection["kind"] == "invalid-fleet" and "hosts/web2.yaml" in rejection["reason"]
    assert all(h["applied_commit"] == good for h in status["hosts"])
    assert motd(world, "web1") == before
    new = world.inbox.refusals()[mails:]
    assert len(new) == 1 and bad[:12] in new[0] and "invalid-fleet" in new[0]
    assert await metric(world, 'reconciler_source_rejected_commits_total{reason="invalid-fleet"}') >= 1
    host_file.write_text(original)


async def test_unsigned_commit_changes_nothing_and_mails_once(world: World) -> None:
    good = (await get_json(world))["source"]["good"]
    before = motd(world, "web1")
    mails = len(world.inbox.refusals())
    set_motd_line(world, "unsigned change")
    bad = world.commit("unsigned change", sign=False)
    world.push()
    assert await send_webhook(world, "unsigned-1") == 202
    await _wait_refusals(world, mails + 1)
    await wait_fetches(world, 2)
    status = await get_json(world)
    assert status["source"]["good"] == good and status["source"]["rejection"]["kind"] == "unsigned"
    assert await metric(world, 'reconciler_source_rejected_commits_total{reason="unsigned"}') >= 1
    assert motd(world, "web1") == before
    new = world.inbox.refusals()[mails:]
    assert len(new) == 1 and bad[:12] in new[0]
    # A signed fix on top is still refused: the unsigned commit is in its history.
    set_motd_line(world, "signed on unsigned")
    on_top = world.commit("signed on top of unsigned")
    world.push()
    await send_webhook(world, "unsigned-2")
    deadline = time.monotonic() + 60
    while (await get_json(world))["source"]["head"] != on_top:  # the daemon saw the new head...
        assert time.monotonic() < deadline, "the daemon never fetched the signed commit"
        await asyncio.sleep(0.1)
    await wait_fetches(world, 1)
    status = await get_json(world)
    assert status["source"]["good"] == good and status["source"]["rejection"] is not None  # ...and refused it
    # Rewrite history (as an admin would): drop the unsigned commits, push a signed one.
    git(world.work, "reset", "-q", "--hard", good)
    set_motd_line(world, "clean again")
    head = world.commit("clean again")
    git(world.work, "push", "-q", "--force", "origin", "main")
    await send_webhook(world, "clean-1")
    await wait_converged(world, head)
    assert "clean again" in motd(world, "web1")


async def test_webhook_storm_one_in_flight_per_host(world: World) -> None:
    set_motd_line(world, "storm")
    head = world.commit("storm")
    world.push()
    before = await metrics(world)
    samples: list[dict[str, Any]] = []

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append(await get_json(world))
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    task = asyncio.create_task(sampler(stop))
    t0 = time.monotonic()
    codes = await asyncio.gather(*(send_webhook(world, f"storm-{i}") for i in range(100)))
    sent_in = time.monotonic() - t0
    await wait_converged(world, head)
    stop.set()
    await task
    after = await metrics(world)
    assert all(c == 202 for c in codes) and sent_in < 5
    n_hosts = len(samples[-1]["hosts"])
    for st in samples:
        in_flight = st["queue"]["in_flight"]
        assert len(in_flight) == len(set(in_flight))  # never two reconciles of one host
        assert st["queue"]["depth"] <= n_hosts  # at most one queued follow-up per host
    reconciles = after.get("ok", 0) - before.get("ok", 0)
    # not 100 per host: the push's reconcile and at most one follow-up per host, plus one per
    # drift-timer scan that fell in the window (counted, not guessed: a loaded machine is slower)
    ticks = after.get("drift_scans", 0) - before.get("drift_scans", 0)
    assert reconciles <= 2 * n_hosts + ticks, (reconciles, ticks)
    print(f"\n100 webhooks in {sent_in:.2f}s -> {reconciles:.0f} host reconciles for {n_hosts} hosts")


async def metrics(world: World) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(world.base + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("reconciler_reconciles_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("reconciler_drift_scans_total "):
            out["drift_scans"] = float(line.rsplit(" ", 1)[1])
    return out


async def test_sync_command(world: World) -> None:
    env = world.env()
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "sync", "--host", "db1"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr.decode()
    bad = subprocess.run(
        [sys.executable, "-m", "reconciler", "sync"],
        env={**env, "RECONCILER_SERVER_SYNC_TOKEN": "wrong"},
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode == 1 and b"401" in bad.stderr


async def test_sighup_fetches_and_resyncs_every_host(world: World) -> None:
    """SIGHUP to the real daemon process: a fetch and a reconcile of EVERY host, though
    nothing changed in the repo (a hand edit of a managed file is put back by it)."""
    status = await get_json(world)
    n_hosts = len(status["hosts"])
    fetched, before = await metric(world, FETCHED), await reconciles(world)
    assert world.proc is not None and world.proc.poll() is None
    world.lab.exec("db2", ["sh", "-c", "echo 'edited before SIGHUP' >> /etc/motd"])
    world.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while await reconciles(world) < before + n_hosts:
        assert time.monotonic() < deadline, "SIGHUP did not resync every host"
        await asyncio.sleep(0.1)
    assert await metric(world, FETCHED) > fetched
    assert "edited before SIGHUP" not in motd(world, "db2")
    assert world.proc.poll() is None  # SIGHUP is a resync, not a stop


async def test_hand_edit_is_committed_mailed_and_reverted(world: World) -> None:
    history = world.state / "history"
    before_commits = git_dir_log(history)
    mails = len(world.inbox.messages)
    world.lab.exec("web1", ["sh", "-c", "echo 'edited by hand' >> /etc/motd; echo x=1 > /etc/hand-made.conf"])
    t0 = time.monotonic()
    deadline = t0 + DRIFT_PERIOD * 2 + 30
    while time.monotonic() < deadline:
        if "edited by hand" not in motd(world, "web1") and len(world.inbox.messages) > mails:
            break
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - t0
    assert "edited by hand" not in motd(world, "web1")  # enforce mode put the managed file back
    new = [data.decode(errors="replace") for _, data in world.inbox.messages[mails:]]
    assert any("web1" in m and "hand-made.conf" in m for m in new), [m[:300] for m in new]
    assert len(git_dir_log(history)) > len(before_commits)
    print(f"\nhand edit -> reverted and mailed in {elapsed:.1f}s (drift period {DRIFT_PERIOD}s)")
    assert elapsed < DRIFT_PERIOD * 2 + 30
    status = await get_json(world)
    web1 = next(h for h in status["hosts"] if h["name"] == "web1")
    assert web1["last_drift_at"] is not None


def git_dir_log(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", f"--git-dir={repo}", "log", "--all", "--format=%H"],
        capture_output=True,
        env={**os.environ, **GIT_ENV},
    )
    return out.stdout.decode().split()


async def test_sigterm_during_apply_then_restart(world: World) -> None:
    mails = len(world.inbox.refusals())
    set_motd_line(world, "interrupted")
    head = world.commit("interrupted apply")
    world.push()
    await send_webhook(world, "sigterm-1")
    deadline = time.monotonic() + 30
    in_flight: list[str] = []
    while time.monotonic() < deadline and not in_flight:  # wait until the new commit is being applied
        st = await get_json(world)
        in_flight = st["queue"]["in_flight"] if st["source"]["good"] == head else []
        if not in_flight:
            await asyncio.sleep(0.01)
    assert in_flight, "no reconcile of the new commit was ever in flight: SIGTERM would prove nothing"
    t0 = time.monotonic()
    code = world.stop()
    assert code == 0 and time.monotonic() - t0 < 25
    world.start()
    await wait_ready(world)
    await wait_converged(world, head)
    assert "interrupted" in motd(world, "web2")
    await wait_fetches(world, 2)
    assert len(world.inbox.refusals()) == mails  # no duplicate mail after the restart


async def test_secrets_never_logged(world: World) -> None:
    text = world.all_logs()
    assert WEBHOOK_SECRET not in text and SYNC_TOKEN not in text
    status = json.dumps(await get_json(world))
    assert WEBHOOK_SECRET not in status and SYNC_TOKEN not in status
    assert world.stop() == 0
