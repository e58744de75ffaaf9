"""Scaling past one machine's usual lab: 10, 100, 300 and 1,000 hosts (issue #20).

Run as root: ``python bench/bench_scale.py [--sizes 10,100,300,1000] [--files 8]
[--daemon HOSTS:PUSHES[:TRACEMALLOC] ...] [--degree 4]``.
Per size, one lab (hosts at 198.18.0.11.., RFC 2544's block):
- lab: bring-up until every sshd answers, PSS per idle host, teardown;
- engine (bench_engine.measure, ``--files`` managed files + a tree validator + a reload per host):
  the floor (one command over a fresh connection per host), no-op plan cold and warm, one drifted
  file per host planned and applied;
- daemon (``--daemon HOSTS:PUSHES``): a real ``reconciler run`` on a fleet of the same hosts
  (``topology: links``: the firewall and one templated file per host; with ``--degree D`` each
  host has D IPsec peers, strongSwan over libipsec, and the keys phase runs first: first
  converge, ``reconciler keys collect``, the keys pushed, every pair up by the daemon's verify),
  then pushes of a one-file change (signed, by webhook): push to converged and to verified, the
  daemon's CPU per push, its RSS, open fds, threads, tasks, gc objects after each (growth = leak).
  ``BENCH_PUSH_DEADLINE`` (Unix time) or ``BENCH_STOP_FILE`` cut the pushes short.
Writes bench/results/scale.md. Big labs load the machine: run it briefly, never leave a lab up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_daemon import GIT_ENV, daemon_cpu_seconds, free_port, git  # noqa: E402
from bench_engine import measure  # noqa: E402
from bench_lab import pss_per_host  # noqa: E402

from reconciler.lab import Lab, LabHostSpec  # noqa: E402
from reconciler.lab.model import big_address  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "scale.md"
SECRET = "bench-scale-secret"


def ring_links(names: list[str], degree: int) -> list[tuple[str, str]]:
    """Each host linked to the next ``degree // 2`` hosts (mod N): every host has ``degree`` peers."""
    n = len(names)
    if degree % 2 or (degree and n <= degree):
        raise SystemExit(
            f"bench: degree {degree} needs an even degree and more than {degree} hosts (got {n})"
        )
    return [(names[i], names[(i + k) % n]) for k in range(1, degree // 2 + 1) for i in range(n)]


def make_fleet(work: Path, lab: Lab, degree: int = 0) -> None:
    """The bench's fleet: firewall + one templated file per host; with ``degree``, a
    ``topology: links`` IPsec mesh (strongSwan, tunnel mode over libipsec, as the lab runs the
    example fleet: this kernel has no ipip and no kernel ESP) where each host has ``degree`` peers."""
    for d in ("hosts", "roles", "files", "templates", "keys"):
        (work / d).mkdir(parents=True)
    names = [h.name for h in lab.info.hosts]
    links = ", ".join(f"[{a}, {b}]" for a, b in ring_links(names, degree))
    ipsec = "backend: strongswan, mode: tunnel, datapath: libipsec, " if degree else ""
    (work / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Fleet\nname: scale\nid: scale-bench-0001\n"
        f"mesh: {{internal_network: 10.64.0.0/10, {ipsec}topology: links, links: [{links}]}}\n"
        "firewall: {management_sources: [198.19.255.254/32], management_port: 22}\n"
        "drift: {paths: [/etc/motd], interval_seconds: 86400, mode: enforce}\n"
    )
    for i, h in enumerate(lab.info.hosts):
        inner = ipaddress.IPv4Address("10.64.0.10") + i
        (work / f"hosts/{h.name}.yaml").write_text(
            f"apiVersion: reconciler/v1\nkind: Host\nname: {h.name}\npublic_address: {h.address}\n"
            f"internal_address: {inner}\nroles: [plain]\n"
        )
    (work / "roles/plain.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Role\nname: plain\nfiles: [motd]\n"
    )
    (work / "files/motd.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: ManagedFile\nname: motd\npath: /etc/motd\n"
        'template: templates/motd.j2\nmode: "0644"\nowner: root\ngroup: root\n'
    )
    (work / "templates/motd.j2").write_text("push 0 on {{ host.name }}\n")


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    vals = {k: v.split()[0] for k, _, v in (line.partition(":") for line in status.splitlines()) if v.split()}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_kb": float(vals["VmRSS"]), "fds": float(fds), "threads": float(vals["Threads"]), "cpu": cpu}


def probe(pid: int, probe_dir: Path, k: int, timeout: float = 300) -> dict[str, Any]:
    """Ask the daemon (bench/daemon_probe.py) for its tasks and gc counts (and a tracemalloc
    snapshot when traced): the ``k``-th SIGUSR2 writes ``probe-<k>.json``."""
    os.kill(pid, signal.SIGUSR2)
    path = probe_dir / f"probe-{k}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the daemon wrote no {path.name} in {timeout:.0f} s")
        time.sleep(0.1)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def snapshot_diff(probe_dir: Path, a: int, b: int, top: int = 12) -> list[str]:
    """The biggest growths between two tracemalloc snapshots (by line, then by file)."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(probe_dir / f"probe-{a}.snap"))
    new = tracemalloc.Snapshot.load(str(probe_dir / f"probe-{b}.snap"))
    flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*>")]
    old, new = old.filter_traces(flt), new.filter_traces(flt)
    lines = [f"total traced: {sum(s.size for s in old.statistics('filename')) / 1024:.0f} kB at probe {a}, "
             f"{sum(s.size for s in new.statistics('filename')) / 1024:.0f} kB at probe {b}"]  # fmt: skip
    lines += [f"line: {d}" for d in new.compare_to(old, "lineno")[:top]]
    lines += [f"file: {d}" for d in new.compare_to(old, "filename")[:top]]
    return lines


def mem_used_mb() -> int:
    """The machine's memory in use (MemTotal - MemAvailable), MB."""
    info = {
        k: int(v.split()[0])
        for k, _, v in (ln.partition(":") for ln in Path("/proc/meminfo").read_text().splitlines())
    }
    return (info["MemTotal"] - info["MemAvailable"]) // 1024


class SignedRepo:
    """The admins' clone, its bare remote, and an ed25519 key the daemon's allowed_signers trusts:
    every commit is SSH-signed, as a user runs the daemon (``source.verify: ssh``)."""

    def __init__(self, tmp: Path) -> None:
        self.work, self.remote, self.key = tmp / "work", tmp / "fleet.git", tmp / "admin_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(self.key)], check=True
        )
        kt, blob = (tmp / "admin_key.pub").read_text().split()[:2]
        self.allowed = tmp / "allowed_signers"
        self.allowed.write_text(f'ops@example.com namespaces="git" {kt} {blob}\n')
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.remote)], check=True,
                       env={**os.environ, **GIT_ENV})  # fmt: skip

    def init(self) -> None:
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "remote", "add", "origin", str(self.remote))

    def commit(self, message: str) -> str:
        git(self.work, "add", "-A")
        git(self.work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={self.key}",
            "commit", "-q", "-S", "-m", message)  # fmt: skip
        return git(self.work, "rev-parse", "HEAD")

    def push(self) -> None:
        git(self.work, "push", "-q", "origin", "main")


def out_of_time(last_push: float) -> bool:
    """The pushes stop early (the run keeps its rows) when ``$BENCH_STOP_FILE`` exists or the next
    push would end after ``$BENCH_PUSH_DEADLINE`` (a Unix time; 1.5x the last push as its cost)."""
    stop_file = os.environ.get("BENCH_STOP_FILE")
    deadline = float(os.environ.get("BENCH_PUSH_DEADLINE", "inf"))
    return bool(stop_file and Path(stop_file).exists()) or time.time() + 1.5 * last_push > deadline


def daemon_bench(lab: Lab, tmp: Path, pushes: int, traced: int = 0, degree: int = 0) -> dict[str, Any]:
    """``traced``: tracemalloc frame depth in the daemon (0: off; it slows the daemon ~2x and its
    own bookkeeping inflates RSS, so RSS and CPU of a traced run are not the daemon's).
    ``degree``: IPsec peers per host (0: no links); then the keys phase runs before the pushes:
    the first converge makes each host's key pair, ``reconciler keys collect`` (the real CLI)
    writes the public keys into the repo, a signed commit of them is pushed and converged, and
    the daemon's own verify after apply shows the pairs up."""
    n = len(lab.info.hosts)
    repo = SignedRepo(tmp)
    work = repo.work
    make_fleet(work, lab, degree)
    repo.init()
    repo.commit("push 0")
    repo.push()
    port = free_port()
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    poll = max(0.2, n / 500)  # each /status poll costs the daemon a full status (MBs at 1,000 hosts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update({
        "RECONCILER_SOURCE_URL": f"file://{repo.remote}", "RECONCILER_SOURCE_POLL_INTERVAL": "1h",
        "RECONCILER_SOURCE_VERIFY": "ssh", "RECONCILER_SOURCE_ALLOWED_SIGNERS": str(repo.allowed),
        "RECONCILER_SERVER_PORT": str(port), "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
        "RECONCILER_SSH_KNOWN_HOSTS": str(lab.info.known_hosts),
        "RECONCILER_SSH_IDENTITY": str(lab.info.client_key),
        "RECONCILER_STATE_DIR": str(tmp / "state"), "RECONCILER_DRIFT_INTERVAL": "1d",
        "RECONCILER_LOG_LEVEL": "WARNING", "RECONCILER_LOG_JSON": "1",
        "RECONCILER_SSH_CONNECT_TIMEOUT": "60s", "RECONCILER_SSH_COMMAND_TIMEOUT": "300s",
        "BENCH_PROBE_DIR": str(probe_dir), "BENCH_TRACEMALLOC": str(traced),
    })  # fmt: skip

    def status() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=60) as r:  # noqa: S310
            data: dict[str, Any] = json.loads(r.read())
            return data

    def wait_on(commit: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        bad: list[Any] = []
        while time.monotonic() < deadline:
            try:
                hosts = status()["hosts"]
                bad = [(h["name"], h["state"], str(h.get("reason", ""))[:120]) for h in hosts
                       if h["state"] != "Ready" or h["applied_commit"] != commit]  # fmt: skip
                if len(hosts) == n and not bad:
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(poll)
        raise SystemExit(f"bench: {n} hosts not converged on {commit[:12]} in {timeout:.0f} s: {bad[:5]}")

    def wait_verified(commit: str, timeout: float) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = status()
            verify = st.get("verify", {})
            if len(verify) == n and all(v["commit"] == commit for v in verify.values()):
                return time.monotonic(), st
            time.sleep(poll)
        raise SystemExit(
            f"bench: verify after apply did not report {commit[:12]} on {n} hosts in {timeout:.0f} s"
        )

    def webhook() -> None:
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/github", data=body, method="POST",  # noqa: S310
                                     headers={"X-Hub-Signature-256": sig, "Content-Type": "application/json",
                                              "X-GitHub-Delivery": f"b-{time.time_ns()}"})  # fmt: skip
        urllib.request.urlopen(req, timeout=30).close()  # noqa: S310

    def push_motd(text: str) -> tuple[str, float]:
        (work / "templates/motd.j2").write_text(f"{text} on {{{{ host.name }}}}\n")
        head = repo.commit(text)
        t = time.monotonic()
        repo.push()
        webhook()
        return head, t

    def mesh_summary(st: dict[str, Any]) -> dict[str, Any]:
        """Link states (/status mesh) and the verify checks of every host, summed."""
        states = collections.Counter(link["state"] for link in st["mesh"].get("links", []))
        counts: collections.Counter[str] = collections.Counter()
        failed: collections.Counter[str] = collections.Counter()
        for v in st.get("verify", {}).values():
            counts.update(v["counts"])
            failed.update(f"{c.get('name')}: {str(c.get('cause', ''))[:100]}" for c in v["failed"])
        return {"links": dict(states), "checks": dict(counts), "failed_top": failed.most_common(5)}

    log = (tmp / "daemon.log").open("wb")
    script = Path(__file__).resolve().parent / "daemon_probe.py"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
    result: dict[str, Any] = {"degree": float(degree), "poll": poll}
    try:
        t0 = time.monotonic()
        wait_on(git(work, "rev-parse", "HEAD"), 3600)
        result["first"] = first = time.monotonic() - t0
        print(f"  {n} hosts: first converge {first:.1f} s, memory in use {mem_used_mb()} MB", flush=True)
        if degree:
            result.update(keys_phase(lab, repo, n, degree, status, wait_on, wait_verified, webhook,
                                     push_motd, mesh_summary))  # fmt: skip
            pss = pss_per_host(lab)
            result["pss_kb_per_host"] = statistics.median(pss)
            result["pss_mb_total"] = sum(pss) / 1024
            result["mem_used_mb"] = float(mem_used_mb())
            print(f"  {n} hosts: PSS per host with charon {result['pss_kb_per_host']:.0f} kB "
                  f"({result['pss_mb_total']:.0f} MB), memory in use {result['mem_used_mb']:.0f} MB",
                  flush=True)  # fmt: skip
        times, verified, cpus, cpus_all, stats, probes = [], [], [], [], [], []
        for i in range(1, pushes + 1):
            before = proc_stats(proc.pid)
            before_all = daemon_cpu_seconds(proc.pid)
            head, t = push_motd(f"push {i}")
            times.append(wait_on(head, 1800) - t)
            verified.append(wait_verified(head, 1800)[0] - t)
            after = proc_stats(proc.pid)
            cpus.append(after["cpu"] - before["cpu"])
            cpus_all.append(daemon_cpu_seconds(proc.pid) - before_all)
            probes.append(probe(proc.pid, probe_dir, i))
            after["tasks"] = float(probes[-1]["tasks"])
            after["gc_objects"] = float(probes[-1]["gc_objects"])
            stats.append(after)
            print(f"  {n} hosts push {i}: {times[-1]:.2f} s (verified {verified[-1]:.2f} s), daemon CPU "
                  f"{cpus[-1]:.2f} s (+render worker {cpus_all[-1]:.2f} s), "
                  f"RSS {after['rss_kb'] / 1024:.1f} MiB, fds {after['fds']:.0f}, "
                  f"tasks {after['tasks']:.0f}, objects {after['gc_objects']:.0f}, "
                  f"traced {probes[-1]['traced_kb']}, {time.strftime('%H:%M:%S')}", flush=True)  # fmt: skip
            if i < pushes and out_of_time(max(times[-1], verified[-1])):
                print(f"  {n} hosts: pushes cut at {i} (BENCH_STOP_FILE or BENCH_PUSH_DEADLINE)", flush=True)
                break
        if not times:
            return result
        done = len(times)
        # growth: the floor of the last pushes above the top of the first ones (a count that
        # leaks rises on every push; tasks and fds in flight at the probe come and go by 1-3)
        w = max(1, min(5, len(stats) // 2))

        def growth(key: str) -> float:
            return min(s[key] for s in stats[-w:]) - max(s[key] for s in stats[:w])

        result.update({
            "pushes": float(done),
            "push_median": statistics.median(times),
            "push_max": max(times),
            "verified_median": statistics.median(verified),
            "cpu_per_host_ms": statistics.median(cpus) / n * 1000,
            "cpu_all_per_host_ms": statistics.median(cpus_all) / n * 1000,
            "rss_kb_per_host": stats[-1]["rss_kb"] / n,
            "rss_kb": stats[-1]["rss_kb"],
            "fds": stats[-1]["fds"],
            "fds_per_host": stats[-1]["fds"] / n,
            "threads": stats[-1]["threads"],
            "fd_growth": growth("fds"),
            "task_growth": growth("tasks"),
            "thread_growth": growth("threads"),
            "object_growth": growth("gc_objects"),
            "rss_growth_kb": growth("rss_kb"),
            "rss_growth_kb_all": stats[-1]["rss_kb"] - stats[0]["rss_kb"],
            "series_push_s": times,
            "series_rss_kb": [s["rss_kb"] for s in stats],
            "series_fds": [s["fds"] for s in stats],
            "series_tasks": [s["tasks"] for s in stats],
            "series_objects": [s["gc_objects"] for s in stats],
            "task_names": probes[-1]["task_names"],
        })  # fmt: skip
        ok = result["fd_growth"] <= 0 and result["task_growth"] <= 0
        print(f"ASSERT {n} hosts, pushes 1-{w} vs {done - w + 1}-{done}: "
              f"fd growth {result['fd_growth']:+.0f}, task growth {result['task_growth']:+.0f}: "
              f"{'ok' if ok else 'FAILED'}", flush=True)  # fmt: skip
        result["no_growth"] = ok
        if traced and done >= 2:
            result["tracemalloc"] = snapshot_diff(probe_dir, min(5, done - 1), done)
            print("\n".join(result["tracemalloc"]), flush=True)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(tmp / "daemon.log", os.environ["BENCH_KEEP_LOG"] + f".{n}")


def keys_phase(
    lab: Lab,
    repo: SignedRepo,
    n: int,
    degree: int,
    status: Callable[[], dict[str, Any]],
    wait_on: Callable[[str, float], float],
    wait_verified: Callable[[str, float], tuple[float, dict[str, Any]]],
    webhook: Callable[[], None],
    push_motd: Callable[[str], tuple[str, float]],
    mesh_summary: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """What an admin lives through once: every link pending keys after the first converge, then
    ``reconciler keys collect``, a signed commit of the keys pushed, the peers converged, and the
    daemon's verify after apply (up to two motd pushes re-initiate pairs that met a peer without
    its keys yet, as tests/e2e's wait_mesh_up does)."""
    links = status()["mesh"]["links"]
    pending = sum(link["state"] == "pending-keys" for link in links)
    if len(links) != n * degree // 2 or pending != len(links):
        raise SystemExit(f"bench: expected {n * degree // 2} links pending keys, /status shows {len(links)} "
                         f"({pending} pending)")  # fmt: skip
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "keys", "collect", str(repo.work),
         "--known-hosts", str(lab.info.known_hosts), "--identity", str(lab.info.client_key)],
        capture_output=True, env={k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")},
    )  # fmt: skip
    collect = time.monotonic() - t0
    keys = len(list((repo.work / "keys").glob("*.pub")))
    if res.returncode != 0 or keys != n:
        raise SystemExit(f"bench: keys collect exit {res.returncode}, {keys} of {n} keys: "
                         f"{(res.stdout + res.stderr).decode(errors='replace')[-2000:]}")  # fmt: skip
    head = repo.commit("keys: public keys collected from the hosts")
    t1 = time.monotonic()
    repo.push()
    webhook()
    converged = wait_on(head, 3600) - t1
    print(f"  {n} hosts: keys collect {collect:.1f} s, keyed commit converged {converged:.1f} s, "
          f"memory in use {mem_used_mb()} MB", flush=True)  # fmt: skip
    at, st = wait_verified(head, 3600)
    summary = mesh_summary(st)
    print(f"  {n} hosts: keyed commit verified {at - t1:.1f} s: {summary}", flush=True)
    out: dict[str, Any] = {"keys_collect": collect, "keys_converge": converged, "keys_verified": at - t1}
    nudges = 0
    while summary["links"].get("up", 0) != n * degree // 2 and nudges < 2:
        nudges += 1
        head, _ = push_motd(f"push 0 nudge {nudges}")
        wait_on(head, 3600)
        at, st = wait_verified(head, 3600)
        summary = mesh_summary(st)
        print(f"  {n} hosts: nudge {nudges} verified {at - t1:.1f} s: {summary}", flush=True)
    out.update({"mesh_nudges": float(nudges), "mesh_settled": at - t1,
                "links_up": float(summary["links"].get("up", 0)), "links": summary["links"],
                "checks": summary["checks"], "failed_top": summary["failed_top"]})  # fmt: skip
    return out


def subset(lab: Lab, n: int) -> Lab:
    """The first ``n`` hosts of a running lab, as a Lab (not owned: downing it is the big lab's job)."""
    return Lab(dataclasses.replace(lab.info, hosts=lab.info.hosts[:n]), owned=False)


def run(
    sizes: list[int],
    files: int,
    daemons: list[tuple[int, int, int]],
    degree: int = 0,
    partial: Path | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
    """ONE lab of the biggest size (one turn at the machine-wide lab lock), measured on its first
    10, 100, ... hosts: each size is a fleet of that many hosts on the same lab. ``daemons``:
    (hosts, pushes, tracemalloc depth) per daemon run, in order; ``degree``: IPsec peers per host
    in the daemon's fleets. ``partial``: the rows so far, written after each (an interrupted run
    keeps them)."""
    n = max([*sizes, *(d[0] for d in daemons)])
    specs = [LabHostSpec(f"s{i + 1}", big_address(i)) for i in range(n)]
    lab = Lab.up(specs, ready_timeout=900, lock_timeout=3600)
    labrow = {
        "hosts": float(n),
        "lab up": lab.timings["build"],
        "lock wait": lab.timings.get("lock_wait", 0.0),
    }
    rows, drows = [], []
    try:
        labrow["PSS/host (kB)"] = statistics.median(pss_per_host(lab))
        print("lab", labrow, flush=True)
        for size in sizes:  # the engine first, every size; then the daemon (a failure loses no row)
            row: dict[str, Any] = {"hosts": size, **asyncio.run(measure(subset(lab, size), files))}
            print(size, {k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, flush=True)
            rows.append(row)
        for size, pushes, traced in daemons:
            drow: dict[str, Any] = {"hosts": size, "traced": traced}
            try:
                with tempfile.TemporaryDirectory(prefix=f"bench-scale-{size}-") as tmp:
                    drow.update(daemon_bench(subset(lab, size), Path(tmp), pushes, traced, degree))
                print(size, "daemon", drow, flush=True)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - report and keep the other rows
                print(size, "daemon failed:", exc, flush=True)
                drow["failed"] = str(exc)
            drows.append(drow)
            if partial is not None:
                partial.write_text(
                    json.dumps({"lab": labrow, "engine": rows, "daemon": drows}, indent=1, default=str)
                )
    finally:
        t = time.monotonic()
        left = lab.down()
        labrow["lab down"] = time.monotonic() - t
        print("lab", labrow, "left", left, flush=True)
    return labrow, rows, drows


def parse_daemon(spec: str) -> tuple[int, int, int]:
    """``HOSTS:PUSHES[:TRACEMALLOC_DEPTH]``."""
    parts = [int(x) for x in spec.split(":")]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,300,1000", help="engine sizes ('' for none)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument(
        "--daemon",
        action="append",
        type=parse_daemon,
        help="HOSTS:PUSHES[:TRACEMALLOC_DEPTH], repeatable (default 10:20 100:20 300:20)",
    )
    ap.add_argument(
        "--degree", type=int, default=0, help="IPsec peers per host in the daemon's fleets (even)"
    )
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",") if n]
    daemons = args.daemon or [(10, 20, 0), (100, 20, 0), (300, 20, 0)]
    partial = Path(args.out).with_suffix(".partial.json")
    labrow, rows, drows = run(sizes, args.files, daemons, args.degree, partial)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"lab": labrow, "engine": rows, "daemon": drows}, indent=1, default=str)
    )
    keys = ["floor (1 cmd, fresh conn)", "no-op plan, cold",
            "no-op plan, warm", "plan, 1 drifted file/host, warm",
            "apply 1 file/host (+validate, reload, verify), warm", "initial converge"]  # fmt: skip
    argv = " ".join(sys.argv[1:])
    lines = [
        "# Scaling: 10 to 1,000 hosts",
        "",
        f"Lab of {labrow['hosts']:.0f} hosts: up {labrow['lab up']:.1f} s (every sshd answering), "
        f"{labrow['PSS/host (kB)']:.0f} kB PSS per idle host, down {labrow['lab down']:.1f} s.",
        "",
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, machine shared with "
        f"other work. `python bench/bench_scale.py {argv}`.",
        "",
    ]
    if rows:
        lines += [
            "| step | " + " | ".join(f"{r['hosts']} hosts" for r in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for k in keys:
            lines.append(f"| {k} (s) | " + " | ".join(f"{r[k]:.2f}" if k in r else "–" for r in rows) + " |")
        lines.append(
            "| no-op plan cold / floor | "
            + " | ".join(f"{r['no-op plan, cold'] / r['floor (1 cmd, fresh conn)']:.2f}x" for r in rows)
            + " |"
        )
        lines.append("")
    dkeys = ["degree", "pushes", "first", "keys_collect", "keys_converge", "keys_verified", "mesh_nudges",
             "mesh_settled", "links_up", "pss_kb_per_host", "pss_mb_total", "mem_used_mb", "poll",
             "push_median", "push_max", "verified_median", "cpu_per_host_ms", "cpu_all_per_host_ms", "rss_kb",
             "rss_kb_per_host", "fds", "fds_per_host", "threads", "fd_growth", "task_growth", "thread_growth",
             "object_growth", "rss_growth_kb", "rss_growth_kb_all"]  # fmt: skip
    if drows:
        head = [
            f"{d['hosts']} hosts" + (f" (tracemalloc {d['traced']})" if d["traced"] else "") for d in drows
        ]
        lines += ["| daemon | " + " | ".join(head) + " |", "|---|" + "---:|" * len(drows)]
        for k in dkeys:
            cells = [f"{d[k]:.2f}" if k in d else "–" for d in drows]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        for d in drows:
            if "failed" in d:
                lines.append(f"\n{d['hosts']} hosts daemon failed: {d['failed']}")
            for key in ("links", "checks", "failed_top"):
                if key in d:
                    lines.append(f"\n{d['hosts']} hosts {key}: {d[key]}")
            for series in ("series_push_s", "series_rss_kb", "series_fds", "series_tasks", "series_objects"):
                if series in d:
                    fmt = ".1f" if series == "series_push_s" else ".0f"
                    lines.append(
                        f"\n{d['hosts']} hosts {series}: {' '.join(format(v, fmt) for v in d[series])}"
                    )
            if "tracemalloc" in d:
                lines += ["", f"{d['hosts']} hosts, tracemalloc diff:", "", "```", *d["tracemalloc"], "```"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(not d.get("no_growth", True) for d in drows):
        raise SystemExit("bench: fd or task growth (see ASSERT lines)")


if __name__ == "__main__":
    main()
