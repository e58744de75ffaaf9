"""What this kernel can and cannot do for the lab, probed live (in a scratch netns).

Each probe gives a yes/no and a one-line reason; tests that need a missing feature skip with
that reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROBE_NETNS_PREFIX = "rcl-probe-"
AF_KEY = 15
PF_KEY_V2 = 2

ESP_KEY = "0x" + "11" * 16
AUTH_KEY = "0x" + "22" * 32


@dataclass(frozen=True)
class Capability:
    name: str
    available: bool
    reason: str  # one line: what was tried and what happened

    def __str__(self) -> str:
        return f"{self.name:<13} {'yes' if self.available else 'no ':<4} {self.reason}"


@dataclass(frozen=True)
class Capabilities:
    items: tuple[Capability, ...]

    def get(self, name: str) -> Capability:
        for c in self.items:
            if c.name == name:
                return c
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return self.get(name).available

    def reason(self, name: str) -> str:
        c = self.get(name)
        return f"{c.name}: {c.reason}"

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {c.name: {"available": c.available, "reason": c.reason} for c in self.items}


def _run(argv: list[str]) -> tuple[bool, str]:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    msg = (p.stderr or p.stdout).decode(errors="replace").strip().splitlines()
    return p.returncode == 0, (msg[-1] if msg else f"exit {p.returncode}")


def _probe_in_netns(ns: str) -> dict[str, Capability]:
    out: dict[str, Capability] = {}

    ok, msg = _run(
        ["ip", "-n", ns, "link", "add", "rclt0", "type", "ipip", "local", "192.0.2.1", "remote", "192.0.2.2"]
    )
    out["ipip"] = Capability(
        "ipip", ok, "`ip link add type ipip` works" if ok else f"`ip link add type ipip`: {msg}"
    )

    for proto, spi, algs in (
        ("esp", "0x100", ["enc", "cbc(aes)", ESP_KEY, "auth", "hmac(sha256)", AUTH_KEY]),
        ("ah", "0x101", ["auth", "hmac(sha256)", AUTH_KEY]),
    ):
        ok, msg = _run(
            ["ip", "-n", ns, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2"]
            + ["proto", proto, "spi", spi, "mode", "transport", *algs]
        )
        tried = f"`ip xfrm state add proto {proto}`"
        name = f"kernel_{proto}"
        out[name] = Capability(name, ok, f"{tried} works" if ok else f"{tried}: {msg}")

    ok, msg = _run(
        [
            "ip",
            "-n",
            ns,
            "xfrm",
            "policy",
            "add",
            "src",
            "192.0.2.1/32",
            "dst",
            "192.0.2.2/32",
            "dir",
            "out",
            "tmpl",
            "proto",
            "esp",
            "mode",
            "transport",
            "level",
            "required",
        ]
    )
    out["xfrm_policy"] = Capability(
        "xfrm_policy", ok, "`ip xfrm policy add` works (per netns)" if ok else f"`ip xfrm policy add`: {msg}"
    )

    ok, msg = _run(["ip", "-n", ns, "tuntap", "add", "dev", "rclt1", "mode", "tun"])
    if not Path("/dev/net/tun").exists():
        ok, msg = False, "/dev/net/tun does not exist"
    out["tun"] = Capability(
        "tun", ok, "/dev/net/tun and `ip tuntap add` work (strongSwan libipsec)" if ok else f"TUN: {msg}"
    )

    ok, msg = _run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "iptables",
            "-w",
            "5",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-m",
            "policy",
            "--pol",
            "ipsec",
            "--dir",
            "out",
            "-j",
            "ACCEPT",
        ]
    )
    out["policy_match"] = Capability(
        "policy_match", ok, "iptables `-m policy --pol ipsec` loads" if ok else f"iptables -m policy: {msg}"
    )
    return out


def _pf_key() -> Capability:
    try:
        s = socket.socket(AF_KEY, socket.SOCK_RAW, PF_KEY_V2)
    except OSError as exc:
        return Capability("pf_key", False, f"socket(PF_KEY): {exc.strerror or exc} (no racoon/setkey)")
    s.close()
    return Capability("pf_key", True, "socket(PF_KEY) opens")


def _apparmor() -> Capability:
    if Path("/sys/kernel/security/apparmor").is_dir():
        return Capability("apparmor", True, "AppArmor LSM active (/sys/kernel/security/apparmor)")
    try:
        enabled = Path("/sys/module/apparmor/parameters/enabled").read_text().strip()
    except OSError:
        enabled = ""
    if enabled == "Y":
        return Capability("apparmor", True, "AppArmor module enabled")
    parser = " (apparmor_parser -Q -K still checks profiles)" if shutil.which("apparmor_parser") else ""
    return Capability(
        "apparmor", False, "AppArmor LSM not active: profiles can only be parsed, not loaded" + parser
    )


def _overlayfs() -> Capability:
    try:
        ok = "overlay" in Path("/proc/filesystems").read_text().split()
    except OSError:
        ok = False
    return Capability(
        "overlayfs",
        ok,
        "overlay in /proc/filesystems" if ok else "overlayfs not in /proc/filesystems (lab hosts need it)",
    )


def _tools() -> Capability:
    need = ["ip", "unshare", "nsenter", "pivot_root", "iptables-restore"]
    missing = [t for t in need if shutil.which(t) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("/usr/sbin/sshd")
    if os.geteuid() != 0:
        return Capability("lab", False, "not root: network and mount namespaces need root")
    if missing:
        return Capability("lab", False, f"missing tools: {', '.join(missing)}")
    return Capability("lab", True, "root, ip, unshare, nsenter, sshd present")


@functools.lru_cache(maxsize=1)
def probe_capabilities() -> Capabilities:
    """Probe once per process (about 0.2 s)."""
    basic = [_tools(), _overlayfs(), _pf_key(), _apparmor()]
    netns_caps: dict[str, Capability] = {}
    if basic[0].available:
        ns = f"{PROBE_NETNS_PREFIX}{os.getpid()}"  # never mistaken for a lab (see cleanup)
        ok, msg = _run(["ip", "netns", "add", ns])
        try:
            if ok:
                netns_caps = _probe_in_netns(ns)
        finally:
            _run(["ip", "netns", "del", ns])
        if not ok:
            basic[0] = Capability("lab", False, f"`ip netns add`: {msg}")
    names = ["ipip", "kernel_esp", "kernel_ah", "xfrm_policy", "tun", "policy_match"]
    probed = [
        netns_caps.get(n) or Capability(n, False, "not probed (needs root and a scratch netns)")
        for n in names
    ]
    return Capabilities(tuple(basic[:2] + probed + basic[2:]))


Probe = Callable[[], Capability]
