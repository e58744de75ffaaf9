"""Scaling past one machine's usual lab: 10, 100, 300 and 1,000 hosts (issue #20).

Run as root: ``python bench/bench_scale.py [--sizes 10,100,300,1000] [--files 8] [--pushes 20]
[--daemon-max 300]``. Per size, one lab (hosts at 198.18.0.11.., RFC 2544's block):
- lab: bring-up until every sshd answers, PSS per idle host, teardown;
- engine (bench_engine.measure, ``--files`` managed files + a tree validator + a reload per host):
  the floor (one command over a fresh connection per host), no-op plan cold and warm, one drifted
  file per host planned and applied;
- daemon (up to ``--daemon-max`` hosts): a real ``reconciler run`` on a fleet of the same hosts
  (``topology: links`` with no IPsec pair: the firewall and one templated file per host), then
  ``--pushes`` pushes of a one-file change, each by webhook: push to converged, the daemon's CPU
  per push, its RSS, open fds and threads after each push (growth = leak).
Writes bench/results/scale.md. Big labs load the machine: run it briefly, never leave a lab up.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_daemon import GIT_ENV, free_port, git  # noqa: E402
from bench_engine import measure  # noqa: E402
from bench_lab import pss_per_host  # noqa: E402

from reconciler.lab import Lab, LabHostSpec  # noqa: E402
from reconciler.lab.model import big_address  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "scale.md"
SECRET = "bench-scale-secret"


def make_fleet(work: Path, lab: Lab) -> None:
    for d in ("hosts", "roles", "files", "templates"):
        (work / d).mkdir(parents=True)
    (work / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Fleet\nname: scale\nid: scale-bench-0001\n"
        "mesh: {internal_network: 10.64.0.0/10, topology: links, links: []}\n"
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


def daemon_bench(lab: Lab, tmp: Path, pushes: int, traced: int = 0) -> dict[str, Any]:
    """``traced``: tracemalloc frame depth in the daemon (0: off; it slows the daemon ~2x and its
    own bookkeeping inflates RSS, so RSS and CPU of a traced run are not the daemon's)."""
    n = len(lab.info.hosts)
    work, remote = tmp / "work", tmp / "fleet.git"
    make_fleet(work, lab)
    subprocess.run(
        ["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True, env={**os.environ, **GIT_ENV}
    )
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", str(remote))
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "push 0")
    git(work, "push", "-q", "origin", "main")
    port = free_port()
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update({
        "RECONCILER_SOURCE_URL": f"file://{remote}", "RECONCILER_SOURCE_POLL_INTERVAL": "1h",
        "RECONCILER_SERVER_PORT": str(port), "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
        "RECONCILER_SSH_KNOWN_HOSTS": str(lab.info.known_hosts),
        "RECONCILER_SSH_IDENTITY": str(lab.info.client_key),
        "RECONCILER_STATE_DIR": str(tmp / "state"), "RECONCILER_DRIFT_INTERVAL": "1d",
        "RECONCILER_LOG_LEVEL": "WARNING", "RECONCILER_LOG_JSON": "1",
        "RECONCILER_SSH_CONNECT_TIMEOUT": "60s", "RECONCILER_SSH_COMMAND_TIMEOUT": "300s",
        "BENCH_PROBE_DIR": str(probe_dir), "BENCH_TRACEMALLOC": str(traced),
    })  # fmt: skip

    def status() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as r:  # noqa: S310
            data: dict[str, Any] = json.loads(r.read())
            return data

    def wait_on(commit: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                hosts = status()["hosts"]
                if len(hosts) == n and all(
                    h["state"] == "Ready" and h["applied_commit"] == commit for h in hosts
                ):
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"bench: {n} hosts not converged on {commit[:12]} in {timeout:.0f} s")

    def webhook() -> None:
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/github", data=body, method="POST",  # noqa: S310
                                     headers={"X-Hub-Signature-256": sig, "Content-Type": "application/json",
                                              "X-GitHub-Delivery": f"b-{time.time_ns()}"})  # fmt: skip
        urllib.request.urlopen(req, timeout=10).close()  # noqa: S310

    log = (tmp / "daemon.log").open("wb")
    script = Path(__file__).resolve().parent / "daemon_probe.py"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        wait_on(git(work, "rev-parse", "HEAD"), 1800)
        first = time.monotonic() - t0
        times, cpus, stats, probes = [], [], [], []
        for i in range(1, pushes + 1):
            (work / "templates/motd.j2").write_text(f"push {i} on {{{{ host.name }}}}\n")
            git(work, "commit", "-q", "-am", f"push {i}")
            before = proc_stats(proc.pid)
            t = time.monotonic()
            git(work, "push", "-q", "origin", "main")
            webhook()
            times.append(wait_on(git(work, "rev-parse", "HEAD"), 1800) - t)
            after = proc_stats(proc.pid)
            cpus.append(after["cpu"] - before["cpu"])
            probes.append(probe(proc.pid, probe_dir, i))
            after["tasks"] = float(probes[-1]["tasks"])
            after["gc_objects"] = float(probes[-1]["gc_objects"])
            stats.append(after)
            print(f"  {n} hosts push {i}: {times[-1]:.2f} s, daemon CPU {cpus[-1]:.2f} s, "
                  f"RSS {after['rss_kb'] / 1024:.1f} MiB, fds {after['fds']:.0f}, "
                  f"tasks {after['tasks']:.0f}, objects {after['gc_objects']:.0f}, "
                  f"traced {probes[-1]['traced_kb']}", flush=True)  # fmt: skip
        # growth: the floor of the last pushes above the top of the first ones (a count that
        # leaks rises on every push; tasks and fds in flight at the probe come and go by 1-3)
        w = max(1, min(5, len(stats) // 2))

        def growth(key: str) -> float:
            return min(s[key] for s in stats[-w:]) - max(s[key] for s in stats[:w])

        result: dict[str, Any] = {
            "pushes": float(pushes),
            "first": first,
            "push_median": statistics.median(times),
            "push_max": max(times),
            "cpu_per_host_ms": statistics.median(cpus) / n * 1000,
            "rss_kb_per_host": stats[-1]["rss_kb"] / n,
            "rss_kb": stats[-1]["rss_kb"],
            "fds_per_host": stats[-1]["fds"] / n,
            "fd_growth": growth("fds"),
            "task_growth": growth("tasks"),
            "thread_growth": growth("threads"),
            "object_growth": growth("gc_objects"),
            "rss_growth_kb": growth("rss_kb"),
            "rss_growth_kb_all": stats[-1]["rss_kb"] - stats[0]["rss_kb"],
            "series_rss_kb": [s["rss_kb"] for s in stats],
            "series_fds": [s["fds"] for s in stats],
            "series_tasks": [s["tasks"] for s in stats],
            "series_objects": [s["gc_objects"] for s in stats],
            "task_names": probes[-1]["task_names"],
        }
        ok = result["fd_growth"] <= 0 and result["task_growth"] <= 0
        print(f"ASSERT {n} hosts, pushes 1-{w} vs {pushes - w + 1}-{pushes}: "
              f"fd growth {result['fd_growth']:+.0f}, task growth {result['task_growth']:+.0f}: "
              f"{'ok' if ok else 'FAILED'}", flush=True)  # fmt: skip
        result["no_growth"] = ok
        if traced and pushes >= 2:
            result["tracemalloc"] = snapshot_diff(probe_dir, min(5, pushes - 1), pushes)
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


def subset(lab: Lab, n: int) -> Lab:
    """The first ``n`` hosts of a running lab, as a Lab (not owned: downing it is the big lab's job)."""
    return Lab(dataclasses.replace(lab.info, hosts=lab.info.hosts[:n]), owned=False)


def run(
    sizes: list[int], files: int, daemons: list[tuple[int, int, int]]
) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
    """ONE lab of the biggest size (one turn at the machine-wide lab lock), measured on its first
    10, 100, ... hosts: each size is a fleet of that many hosts on the same lab. ``daemons``:
    (hosts, pushes, tracemalloc depth) per daemon run, in order."""
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
                    drow.update(daemon_bench(subset(lab, size), Path(tmp), pushes, traced))
                print(size, "daemon", drow, flush=True)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - report and keep the other rows
                print(size, "daemon failed:", exc, flush=True)
                drow["failed"] = str(exc)
            drows.append(drow)
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
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",") if n]
    daemons = args.daemon or [(10, 20, 0), (100, 20, 0), (300, 20, 0)]
    labrow, rows, drows = run(sizes, args.files, daemons)
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
    dkeys = ["pushes", "first", "push_median", "push_max", "cpu_per_host_ms", "rss_kb", "rss_kb_per_host",
             "fds_per_host", "fd_growth", "task_growth", "thread_growth", "object_growth", "rss_growth_kb",
             "rss_growth_kb_all"]  # fmt: skip
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
            for series in ("series_rss_kb", "series_fds", "series_tasks", "series_objects"):
                if series in d:
                    lines.append(f"\n{d['hosts']} hosts {series}: {' '.join(f'{v:.0f}' for v in d[series])}")
            if "tracemalloc" in d:
                lines += ["", f"{d['hosts']} hosts, tracemalloc diff:", "", "```", *d["tracemalloc"], "```"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(not d.get("no_growth", True) for d in drows):
        raise SystemExit("bench: fd or task growth (see ASSERT lines)")


if __name__ == "__main__":
    main()
