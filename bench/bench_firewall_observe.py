"""What managing IPv6 costs on the no-op path: observing hosts whose Desired has a firewall,
with rules.v4 only (before) and with rules.v4 + rules.v6 (now: one more section, one
`ip6tables-save` per host), warm connections, the hosts in sync.

    sudo python bench/bench_firewall_observe.py [--hosts 10 50] [--rounds 20]

Each size: a fresh lab, hosts with the example fleet's firewall (roles alternating web/db,
full mesh, mode tunnel + libipsec), both rulesets loaded by a first apply, then per round one
no-op observe + plan of every host concurrently (one SSH round trip each), alternating the two
variants. Writes bench/results/firewall.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reconciler import log as logsetup  # noqa: E402
from reconciler.domains import firewall  # noqa: E402
from reconciler.engine.apply import apply_host  # noqa: E402
from reconciler.engine.observe import observe_host  # noqa: E402
from reconciler.engine.plan import plan_host  # noqa: E402
from reconciler.fleet.load import load_fleet  # noqa: E402
from reconciler.fleet.model import Fleet  # noqa: E402
from reconciler.host.connection import ConnectionPool, targets_for  # noqa: E402
from reconciler.kinds.resources import Desired  # noqa: E402
from reconciler.lab import Lab, specs_from_fleet  # noqa: E402

OUT = ROOT / "bench" / "results" / "firewall.md"


def make_fleet(tmp: Path, n: int) -> Fleet:
    repo = tmp / f"fleet-{n}"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    text = (repo / "fleet.yaml").read_text()
    text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    (repo / "fleet.yaml").write_text(text)
    for f in (repo / "hosts").glob("*.yaml"):
        f.unlink()
    for i in range(1, n + 1):
        role = "web" if i % 2 else "db"
        (repo / "hosts" / f"b{i:02d}.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Host\n"
            f"name: b{i:02d}\npublic_address: 192.0.2.{100 + i}\ninternal_address: 10.99.0.{100 + i}\n"
            f"public_address_v6: '2001:db8::{100 + i}'\nroles: [{role}]\n"
        )
    return load_fleet(repo)


def firewall_only(fleet: Fleet, name: str, v6: bool) -> Desired:
    frag = firewall.render(fleet, fleet.host(name))
    assert frag.firewall is not None
    fw = frag.firewall if v6 else replace(frag.firewall, rules_v6=None)
    return Desired(host=name, firewall=fw)


async def run(fleet: Fleet, lab: Lab, rounds: int) -> dict[str, list[float]]:
    targets = targets_for(
        fleet, known_hosts=str(lab.info.known_hosts), client_keys=[str(lab.info.client_key)]
    )
    names = fleet.host_names()
    variants = {v: {n: firewall_only(fleet, n, v) for n in names} for v in (False, True)}
    times: dict[str, list[float]] = {"v4 only": [], "v4 + v6": []}
    async with ConnectionPool(targets, connect_timeout=20, command_timeout=120) as pool:
        for n in names:  # load both rulesets once (window long: the machine is shared)
            d = variants[True][n]
            plan = plan_host(d, await observe_host(await pool.get(n), d))
            res = await apply_host(pool, n, plan, d, firewall_window=30)
            assert res.ok, res.messages

        async def noop(name: str, v6: bool) -> None:
            # stat_inventory=False in both: the hosts' inventory lists rules.v6, which the v4-only
            # Desired does not declare; statting it would cost that variant a second round trip
            d = variants[v6][name]
            plan = plan_host(d, await observe_host(await pool.get(name), d, stat_inventory=False))
            assert not [a for a in plan.actions if a.kind.value == "restore-firewall"], plan.actions

        for r in range(rounds):
            for v6 in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.monotonic()
                await asyncio.gather(*(noop(n, v6) for n in names))
                times["v4 + v6" if v6 else "v4 only"].append(time.monotonic() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    logsetup.configure(json=False, level="WARNING")
    rows = []
    for n in args.hosts:
        with tempfile.TemporaryDirectory() as tmp:
            fleet = make_fleet(Path(tmp), n)
            lab = Lab.up(specs_from_fleet(fleet), lock_timeout=7200)
            try:
                times = asyncio.run(run(fleet, lab, args.rounds))
            finally:
                lab.down()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med["v4 only"], med["v4 + v6"], min(times["v4 only"]), min(times["v4 + v6"])))
        print(
            f"{n} hosts: v4 only {med['v4 only']:.3f} s, v4 + v6 {med['v4 + v6']:.3f} s (median)", flush=True
        )
    lines = [
        "# firewall: the cost of observing IPv6 too",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}. Command: "
        f"`python bench/bench_firewall_observe.py --hosts {' '.join(map(str, args.hosts))} "
        f"--rounds {args.rounds}`.",
        "No-op observe + plan of every host concurrently (warm connections, hosts in sync, one round trip",
        "each), the Desired being the example fleet's firewall only, with rules.v4 alone (before) and",
        "rules.v4 + rules.v6 (one more section: `ip6tables-save`).",
        "",
        "| hosts | v4 only median (s) | v4 + v6 median (s) | v4 only min | v4 + v6 min | extra per round |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, a, b, amin, bmin in rows:
        lines.append(f"| {n} | {a:.3f} | {b:.3f} | {amin:.3f} | {bmin:.3f} | {100 * (b - a) / a:+.0f}% |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
