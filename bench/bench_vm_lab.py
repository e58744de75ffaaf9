"""VM lab bring-up time and memory per guest, for 2 and 4 QEMU guests.

Run as root: ``python bench/bench_vm_lab.py [--sizes 2,4] [--cold]``.
Measures, per lab size:
- image: the cached base image's own build time (``image.json``: mmdebstrap, mke2fs, the prime
  boot); with ``--cold`` the image is built again first and that time is measured here;
- up (warm image): ``Lab.up(vm=True)`` until every guest's sshd answers (overlays, config
  disks, the namespace, QEMU start, boot), and the slowest guest's boot alone;
- ssh: one real SSH connection + command to every guest (asyncssh, strict host keys, the
  socket opened in the lab's namespace);
- memory per guest: PSS of its QEMU process (host side) and the guest's own "used" (free -m);
- down: ``lab.down()``.
The time waiting for the machine-wide lab lock is reported apart. Writes bench/results/vm_lab.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

from reconciler.lab import Lab, LabHostSpec, vm_image
from reconciler.lab.vm_guest import pss_kib

RESULTS = Path(__file__).resolve().parent / "results" / "vm_lab.md"


async def ssh_all(lab: Lab) -> float:
    from reconciler.host.connection import ConnectionPool, SshTarget

    info = lab.info
    targets = {
        h.name: SshTarget(
            host=h.name,
            address=h.address,
            known_hosts=str(info.known_hosts),
            client_keys=(str(info.client_key),),
            netns=info.ssh_netns,
        )
        for h in info.hosts
    }
    t0 = time.monotonic()
    async with ConnectionPool(targets, connect_timeout=60, command_timeout=60) as pool:

        async def one(name: str) -> None:
            conn = await pool.get(name)
            res = await conn.run(["true"])
            assert res.ok

        await asyncio.gather(*(one(n) for n in targets))
    return time.monotonic() - t0


def guest_used_mb(lab: Lab, name: str) -> int:
    out = lab.exec(name, ["free", "-m"], timeout=120).stdout.decode()
    for line in out.splitlines():
        if line.startswith("Mem:"):
            return int(line.split()[2])
    return 0


def measure(n: int) -> dict[str, float]:
    specs = [LabHostSpec(name=f"vm{i + 1}", address=f"192.0.2.{11 + i}") for i in range(n)]
    t0 = time.monotonic()
    lab = Lab.up(specs, vm=True, lock_timeout=3600)
    up = time.monotonic() - t0 - lab.timings.get("lock_wait", 0.0)
    try:
        ssh = asyncio.run(ssh_all(lab))
        pss = [pss_kib(h.pid) / 1024 for h in lab.info.hosts]
        used = [guest_used_mb(lab, h.name) for h in lab.info.hosts]
        boots = [v for k, v in lab.timings.items() if k.startswith("boot:")]
    finally:
        t1 = time.monotonic()
        left = lab.down()
        down = time.monotonic() - t1
    assert not left, left
    return {
        "up": up,
        "lock_wait": lab.timings.get("lock_wait", 0.0),
        "slowest_boot": max(boots),
        "ssh": ssh,
        "pss_mb": sum(pss) / len(pss),
        "guest_used_mb": sum(used) / len(used),
        "down": down,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,4")
    ap.add_argument("--cold", action="store_true", help="build the base image again first (minutes)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the lab needs network namespaces)")
    cold = None
    if args.cold:
        t0 = time.monotonic()
        vm_image.ensure_image(rebuild=True, progress=print)
        cold = time.monotonic() - t0
    img = vm_image.ensure_image(progress=print)
    meta = (img.directory / "image.json").read_text()
    import json

    info = json.loads(meta)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        r = measure(n)
        print(f"{n} guests: {r}", flush=True)
        rows.append((n, r))
    load = os.getloadavg()
    lines = [
        "# VM lab: bring-up time and memory per guest",
        "",
        f"`python bench/bench_vm_lab.py --sizes {args.sizes}{' --cold' if args.cold else ''}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.release()}); QEMU TCG (KVM hangs on "
        f"this machine), 512 MB and 1 vCPU per guest; load average at the end "
        f"{load[0]:.1f} (other engineers' test suites share the CPUs).",
        "",
        f"Base image {img.key}: built in {info.get('build_seconds')} s "
        f"(of which the prime boot {info.get('prime_seconds')} s)"
        + (f"; measured here cold: {cold:.0f} s" if cold is not None else "")
        + ", with the .deb files already downloaded once (a fresh machine downloads ~170 MB first).",
        "",
        "| guests | up, warm image (s) | slowest boot (s) | SSH to all (s) | QEMU PSS per guest (MB) "
        "| used inside the guest (MB) | down (s) | lock wait (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in rows:
        lines.append(
            f"| {n} | {r['up']:.1f} | {r['slowest_boot']:.1f} | {r['ssh']:.1f} | {r['pss_mb']:.0f} "
            f"| {r['guest_used_mb']:.0f} | {r['down']:.1f} | {r['lock_wait']:.1f} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
