"""Lab bring-up time and memory per host, for 10 and 50 hosts.

Run as root: ``python bench/bench_lab.py [--sizes 10,50] [--busy 10]``.
Measures, per lab size:
- up: ``Lab.up`` until every sshd listens and sends its banner;
- ssh: up + one real SSH handshake and command (asyncssh, strict host keys) to every host;
- down: ``lab.down()`` until nothing with the prefix is left;
- PSS per host: /proc/PID/smaps_rollup of every process of the host (its PID namespace and the
  unshare process), idle (sshd only) and, with ``--busy N``, with charon + apache2 running;
- the time spent waiting for the machine-wide lab lock is reported apart, not in "up".
Targets: 50 hosts up < 30 s, < 20 MB/host. Writes bench/results/lab.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

from reconciler.lab import Lab, LabHostSpec, LabInfo

RESULTS = Path(__file__).resolve().parent / "results" / "lab.md"


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def host_pids(init_pid: int) -> list[int]:
    """Every process in the PID namespace of ``init_pid``."""
    try:
        target = os.stat(f"/proc/{init_pid}/ns/pid").st_ino
    except OSError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == target:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def lab_cpu_seconds(lab: Lab) -> float:
    """CPU time used so far by every process of the lab's hosts (user + system, with the
    children they reaped: a host's shells end up in their sshd's or init's counters). One scan
    of /proc for the whole lab."""
    namespaces = set()
    for h in lab.info.hosts:
        try:
            namespaces.add(os.stat(f"/proc/{h.init_pid}/ns/pid").st_ino)
        except OSError:
            continue
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/pid").st_ino not in namespaces:
                continue
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def pss_per_host(lab: Lab) -> list[int]:
    return [sum(pss_kb(p) for p in [h.pid, *host_pids(h.init_pid)]) for h in lab.info.hosts]


async def ssh_all(info: LabInfo) -> float:
    import asyncssh

    async def one(address: str) -> None:
        async with asyncssh.connect(
            address,
            username="root",
            known_hosts=str(info.known_hosts),
            client_keys=[str(info.client_key)],
            connect_timeout=30,
        ) as conn:
            await conn.run("true", check=True)

    t0 = time.monotonic()
    await asyncio.gather(*(one(h.address) for h in info.hosts))
    return time.monotonic() - t0


def start_services(lab: Lab) -> None:
    for h in lab.info.hosts:
        lab.exec(
            h.name,
            ["sh", "-c", "setsid -f /usr/lib/ipsec/charon </dev/null >/dev/null 2>&1; apache2ctl start"],
        )
    deadline = time.monotonic() + 30
    for h in lab.info.hosts:
        while time.monotonic() < deadline:
            r = lab.exec(h.name, ["sh", "-c", "test -S /run/charon.vici && test -s /run/apache2/apache2.pid"])
            if r.returncode == 0:
                break
            time.sleep(0.1)
    time.sleep(1.0)  # apache spawns its workers a moment after the pid file


def specs(n: int) -> list[LabHostSpec]:
    return [LabHostSpec(f"b{i + 1}", f"192.0.2.{11 + i}") for i in range(n)]


def bench(n: int, busy: bool) -> dict[str, float]:
    lab = Lab.up(specs(n))
    up = lab.timings["build"]  # without the time spent in line for the machine-wide lab lock
    try:
        handshake = asyncio.run(ssh_all(lab.info))
        ssh_total = up + handshake
        time.sleep(0.5)
        pss = pss_per_host(lab)
        busy_pss: list[int] = []
        if busy:
            start_services(lab)
            busy_pss = pss_per_host(lab)
    finally:
        t1 = time.monotonic()
        left = lab.down()
        down = time.monotonic() - t1
    assert not left, left
    return {
        "hosts": n,
        "up_s": up,
        "ssh_s": ssh_total,
        "handshakes_s": handshake,
        "down_s": down,
        "pss_mb": sum(pss) / len(pss) / 1024,
        "pss_max_mb": max(pss) / 1024,
        "lock_wait_s": lab.timings["lock_wait"],
        "busy_pss_mb": (sum(busy_pss) / len(busy_pss) / 1024) if busy_pss else float("nan"),
    }


def table(rows: list[dict[str, float]]) -> str:
    head = ("| hosts | up (sshd banner) s | up + SSH to all s | down s | PSS/host idle MB (max) "
            "| PSS/host charon+apache2 MB | (waited for the lab lock s) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
    lines = []
    for r in rows:
        busy = "-" if r["busy_pss_mb"] != r["busy_pss_mb"] else f"{r['busy_pss_mb']:.1f}"
        lines.append(
            f"| {int(r['hosts'])} | {r['up_s']:.2f} | {r['ssh_s']:.2f} | {r['down_s']:.2f} "
            f"| {r['pss_mb']:.2f} ({r['pss_max_mb']:.2f}) | {busy} | {r['lock_wait_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,50")
    ap.add_argument("--busy", type=int, default=10, help="also measure charon+apache2 for this size")
    args = ap.parse_args()
    rows = [bench(int(n), busy=int(n) == args.busy) for n in args.sizes.split(",")]
    md = table(rows)
    print(md)
    ok = all(r["ssh_s"] < 30 and r["pss_mb"] < 20 for r in rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Lab bring-up benchmark\n\n"
        f"Machine: {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `python bench/bench_lab.py`.\n\n"
        + md
        + "\nup: `Lab.up` until every host's sshd listens and answers with its banner. "
        "up + SSH: plus one asyncssh connection (strict host keys) and command per host, all "
        "concurrent. PSS: sum over the host's processes (sshd as PID 1, children, the unshare "
        "process); kernel memory (netns, overlay, slab) is not in PSS. Other helpers' test suites ran on the "
        "machine at the same time.\n\n"
        f"Targets (50 hosts up < 30 s, < 20 MB/host): {'met' if ok else 'NOT met'}.\n"
    )


if __name__ == "__main__":
    main()
