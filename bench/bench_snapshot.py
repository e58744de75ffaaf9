"""Benchmark: /etc snapshots into the history repo over SSH, on lab hosts.

Measures, for one host and for N hosts at once (default 50):
  first      manifest + every file in one tar stream + the first commit
  unchanged  manifest only, no fetch, no commit (the common drift scan)
  one edit   manifest + one file fetched + one commit
Writes bench/results/snapshot.md (and prints it). Needs root (the lab).

    python bench/bench_snapshot.py [--hosts 50] [--out bench/results/snapshot.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from reconciler.drift.history import HistoryRepo, Recall, commit_subject
from reconciler.drift.snapshot import PathPolicy, take_snapshot
from reconciler.host.connection import ConnectionPool, SshTarget
from reconciler.lab import Lab, LabHostSpec

POLICY = PathPolicy(roots=("/etc",), exclude=("/etc/mtab", "/etc/ld.so.cache", "/etc/adjtime"))


async def record(repo: HistoryRepo, conn: object) -> tuple[float, int, int, bool]:
    started = time.perf_counter()
    host = conn.host  # type: ignore[attr-defined]
    recall = Recall(repo, await repo.recorded(host))
    snap = await take_snapshot(
        conn,  # type: ignore[arg-type]
        POLICY,
        recall.sha256,
        recorded_large=recall.large,
        secret_unchanged=recall.secret_unchanged,
    )
    prep = await repo.prepare(snap, recall.previous)
    info = await repo.commit(prep, commit_subject(prep.changes, POLICY.roots))
    return time.perf_counter() - started, len(snap.entries), snap.fetched, info is not None


async def round_of(
    repo: HistoryRepo, pool: ConnectionPool, hosts: Sequence[str]
) -> tuple[float, list[float], int, int]:
    started = time.perf_counter()
    conns = [await pool.get(h) for h in hosts]
    res = await asyncio.gather(*(record(repo, c) for c in conns))
    wall = time.perf_counter() - started
    return wall, [r[0] for r in res], res[0][1], sum(r[2] for r in res)


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0] * 1000:.0f} ms"
    q = statistics.quantiles(xs, n=20)
    return f"median {statistics.median(xs) * 1000:.0f} ms, p95 {q[-1] * 1000:.0f} ms"


async def bench(lab: Lab, n: int, tmp: Path) -> list[str]:
    targets = {
        h.name: SshTarget(
            host=h.name,
            address=h.address,
            known_hosts=str(lab.info.known_hosts),
            client_keys=(str(lab.info.client_key),),
        )
        for h in lab.info.hosts
    }
    names = sorted(targets)
    rows: list[str] = []
    async with ConnectionPool(targets, connect_timeout=30, command_timeout=300) as pool:
        for label, hosts in (("1 host", names[:1]), (f"{n} hosts", names)):
            repo = HistoryRepo.open(tmp / f"hist-{len(hosts)}", tmp / "state")
            await asyncio.gather(*(pool.get(h) for h in hosts))  # connections are not what we measure
            wall, per, entries, fetched = await round_of(repo, pool, hosts)
            rows.append(f"| {label} | first snapshot | {wall:.2f} s | {fmt(per)} | {entries} | {fetched} |")
            wall, per, entries, fetched = await round_of(repo, pool, hosts)
            rows.append(f"| {label} | unchanged | {wall:.2f} s | {fmt(per)} | {entries} | {fetched} |")
            for h in hosts:
                lab.exec(h, ["sh", "-c", 'echo "# bench $(date +%s%N)" >> /etc/hosts'])
            wall, per, entries, fetched = await round_of(repo, pool, hosts)
            rows.append(f"| {label} | one file edited | {wall:.2f} s | {fmt(per)} | {entries} | {fetched} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "snapshot.md"))
    args = ap.parse_args()
    specs = [LabHostSpec(f"bench{i:02d}", f"192.0.2.{100 + i}") for i in range(args.hosts)]
    lab = Lab.up(specs, lock_timeout=3600)  # the machine-wide lab may be busy
    try:
        with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
            rows = asyncio.run(bench(lab, args.hosts, Path(tmp)))
    finally:
        lab.down()
    etc_files = sum(len(files) + len(dirs) for _, dirs, files in os.walk("/etc"))
    lines = [
        "# Snapshot benchmark (bench/bench_snapshot.py)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"kernel {platform.release()}. Lab hosts (sshd in network namespaces) share this machine's",
        f"/etc through an overlay (~{etc_files} paths). Each row: manifest (one round trip), then the",
        "changed files in one tar stream, then the commit into a bare git history repo. Hosts run",
        "concurrently over already-open SSH connections; wall = the whole round, per host = each",
        "host's own time (they overlap).",
        "",
        "| hosts | case | wall | per host | paths | files fetched (total) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
