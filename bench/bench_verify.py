"""How long `verify` takes on a converged lab mesh of N hosts (strongSwan, mode tunnel,
datapath libipsec, full mesh: N*(N-1) ordered pairs, each checked from both sides with a
ping + capture). Writes bench/results/verify.md.

    sudo python bench/bench_verify.py --hosts 10 50 [--runs 3]

Each size: a fresh lab, a fleet generated from fleet-repo-example (hosts without roles, so
only firewall + IPsec: what scales with N), converged with the real engine (apply, keys
collect, apply), then applied again until every pair's SAs are up (the engine's plan starts
again the children that are down: "initiate-child"), then `verify_fleet` timed `--runs` times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from reconciler import log as logsetup  # noqa: E402
from reconciler.fleet.load import load_fleet  # noqa: E402
from reconciler.fleet.model import Fleet  # noqa: E402
from reconciler.lab import Lab, specs_from_fleet  # noqa: E402
from reconciler.verify import Status, VerifyOptions, verify_fleet  # noqa: E402


def make_repo(tmp: Path, n: int) -> Path:
    repo = tmp / f"fleet-{n}"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    text = (repo / "fleet.yaml").read_text()
    text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    (repo / "fleet.yaml").write_text(text)
    for f in (repo / "hosts").glob("*.yaml"):
        f.unlink()
    for i in range(1, n + 1):
        (repo / "hosts" / f"b{i:02d}.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Host\n"
            f"name: b{i:02d}\npublic_address: 192.0.2.{100 + i}\ninternal_address: 10.99.0.{100 + i}\n"
        )
    return repo


def settle(fleet: Fleet, lab: Lab, rounds: int = 10, pause: float = 3.0) -> int:
    """Apply again while pairs are down: the engine re-initiates the children that are not up
    (a child whose first attempt met a peer that had not loaded its config yet). Returns the
    number of extra applies."""
    from test_verify_mesh import _apply, _down_pairs

    for i in range(rounds):
        down = _down_pairs(fleet, lab)
        print(f"  {len(down)} pair(s) down", flush=True)
        if not down:
            return i
        asyncio.run(_apply(fleet, lab))
        time.sleep(pause)
    raise SystemExit(f"bench: SAs still down after {rounds} applies: {sorted(_down_pairs(fleet, lab))[:10]}")


def bench(n: int, runs: int, tmp: Path) -> dict[str, object]:
    from test_verify_mesh import converge, pool_for

    repo = make_repo(tmp, n)
    fleet = load_fleet(repo)
    t0 = time.monotonic()
    lab = Lab.up(specs_from_fleet(fleet))
    try:
        t_up = time.monotonic() - t0
        t0 = time.monotonic()
        fleet = converge(repo, lab)
        t_converge = time.monotonic() - t0
        t0 = time.monotonic()
        extra_applies = settle(fleet, lab)
        t_establish = time.monotonic() - t0
        times: list[float] = []
        last = None
        for _ in range(runs):

            async def once() -> object:
                async with pool_for(fleet, lab) as pool:
                    return await verify_fleet(fleet, None, pool, options=VerifyOptions(host_timeout=120))

            t0 = time.monotonic()
            last = asyncio.run(once())
            times.append(time.monotonic() - t0)
        assert last is not None
        counts = last.counts()  # type: ignore[attr-defined]
        failed = [c for c in last.checks if c.status is Status.FAIL]  # type: ignore[attr-defined]
        return {
            "hosts": n,
            "pairs": len(last.pairs),  # type: ignore[attr-defined]
            "checks": sum(counts.values()),
            "failed": len(failed),
            "first_failures": [f"{c.host}->{c.peer} {c.name}: {c.cause}" for c in failed[:3]],
            "lab_up": t_up,
            "converge": t_converge,
            "establish": t_establish,
            "extra_applies": extra_applies,
            "verify_min": min(times),
            "verify_median": statistics.median(times),
            "verify_max": max(times),
        }
    finally:
        lab.down()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify.md"))
    args = ap.parse_args()
    logsetup.configure(json=False, level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.hosts:
            r = bench(n, args.runs, Path(tmp))
            print(r, flush=True)
            rows.append(r)
    lines = [
        "# verify: time to verify a converged lab mesh",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        f"Command: `python bench/bench_verify.py --hosts {' '.join(map(str, args.hosts))} --runs {args.runs}`.",  # noqa: E501
        "Fleet: strongSwan full mesh, mode tunnel, datapath libipsec, hosts without roles. "
        "Every host pings every peer (3 pings, 0.2 s apart) while tcpdump captures, then one facts "
        "round trip; all hosts concurrently over one SSH pool.",
        "",
        "| hosts | ordered pairs | checks | failed | verify min / median / max (s) | lab up (s) | converge (s) | settle: re-applies, s |",  # noqa: E501
        "|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hosts']} | {r['pairs']} | {r['checks']} | {r['failed']} | "
            f"{r['verify_min']:.2f} / {r['verify_median']:.2f} / {r['verify_max']:.2f} | "
            f"{r['lab_up']:.1f} | {r['converge']:.1f} | {r['extra_applies']}, {r['establish']:.1f} |"
        )
    for r in rows:
        if r["failed"]:
            lines.append("")
            lines.append(f"{r['hosts']} hosts, first failures: " + "; ".join(r["first_failures"]))  # type: ignore[arg-type]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
