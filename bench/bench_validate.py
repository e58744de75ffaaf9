"""Benchmark: load_fleet on a generated 10,000-host fleet (target: under 5 s).

Writes bench/results/validate.md. Run: python3 bench/bench_validate.py [--hosts N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import shutil
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

from reconciler.fleet.load import load_fleet

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "fleet-repo-example"
RESULTS = ROOT / "bench" / "results" / "validate.md"
TARGET_SECONDS = 5.0


def generate(repo: Path, hosts: int) -> None:
    """The example fleet with ``hosts`` hosts (one file each) and a /16 internal network."""
    shutil.copytree(EXAMPLE, repo)
    shutil.rmtree(repo / "hosts")
    (repo / "hosts").mkdir()
    fleet = (
        (repo / "fleet.yaml")
        .read_text()
        .replace("10.99.0.0/24", "10.64.0.0/10")
        .replace("sources: [10.99.0.0/24]", "sources: [10.64.0.0/10]")
    )
    (repo / "fleet.yaml").write_text(fleet)
    roles = repo / "roles" / "db.yaml"
    roles.write_text(roles.read_text().replace("10.99.0.0/24", "10.64.0.0/10"))
    public = int(IPv4Address("100.64.0.1"))
    internal = int(IPv4Address("10.64.0.1"))
    for i in range(hosts):
        role = "web" if i % 2 else "db"
        (repo / "hosts" / f"h{i:05d}.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Host\n"
            f"name: h{i:05d}\npublic_address: {IPv4Address(public + i)}\n"
            f"internal_address: {IPv4Address(internal + i)}\nroles: [{role}]\n"
            "ssh:\n  user: root\n  port: 22\n"
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/validate.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "fleet"
        generate(repo, args.hosts)
        size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
        times = []
        fleet = None
        for _ in range(args.runs):
            start = time.perf_counter()
            fleet = load_fleet(repo)
            times.append(time.perf_counter() - start)
        assert fleet is not None and len(fleet.hosts) == args.hosts
        profile_text = ""
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            load_fleet(repo)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
            profile_text = out.getvalue()
    best, worst = min(times), max(times)
    verdict = "PASS" if best < TARGET_SECONDS else "FAIL"
    print(
        f"load_fleet, {args.hosts} hosts ({size / 1e6:.1f} MB, {args.hosts + 10} files): "
        f"best {best:.2f} s, worst {worst:.2f} s "
        f"(target < {TARGET_SECONDS:.0f} s: {verdict})"
    )
    if profile_text:
        print(profile_text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# validate benchmark\n\n"
            f"`python3 bench/bench_validate.py` — `load_fleet` on a generated fleet of {args.hosts} hosts "
            f"(one file per host, {size / 1e6:.1f} MB), {args.runs} runs, "
            "the example's roles/sites/files.\n\n"
            f"| hosts | best | worst | target | result |\n|---|---|---|---|---|\n"
            f"| {args.hosts} | {best:.2f} s | {worst:.2f} s | < {TARGET_SECONDS:.0f} s | {verdict} |\n\n"
            f"Machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}.\n"
        )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
