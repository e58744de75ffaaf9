"""The VM lab's network: one network namespace that the lab owns, ``<prefix>-vmnet``, holding a
bridge (``br0``, 192.0.2.254/24) and one tap device per guest (``tap<n>``).

Nothing links that namespace to the machine's root namespace: no veth, no route, no forwarding.
Guest traffic can reach the other guests and 192.0.2.254 (the namespace itself), never the
machine's uplink. The reconciler reaches the guests by opening its TCP sockets inside the
namespace (``SshTarget.netns``, ``reconciler.host.netns``); QEMU runs inside it to open the taps.
The namespace's name matches the lab's other names (``<prefix>-*``), so ``lab down`` and the
crash cleanup remove it (and with it the bridge and the taps) like any lab namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from reconciler.lab.model import BRIDGE_ADDRESS, LAB_NETWORK, LabError

BRIDGE = "br0"


def netns_name(prefix: str) -> str:
    return f"{prefix}-vmnet"


def tap_name(index: int) -> str:
    return f"tap{index}"


def mac_address(address: str) -> str:
    """A stable locally administered MAC per guest address (52:54:00 is QEMU's prefix)."""
    octets = [int(x) for x in address.split(".")]
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*octets[1:])


def _ip(argv: Sequence[str], input: bytes | None = None) -> None:
    proc = subprocess.run(["ip", *argv], input=input, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise LabError(
            f"ip {' '.join(argv)}: exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
        )


def create(prefix: str, guests: int) -> str:
    """Create the namespace, its bridge and ``guests`` taps; return the namespace's name."""
    ns = netns_name(prefix)
    _ip(["netns", "add", ns])
    lines = [
        "link set lo up",
        f"link add {BRIDGE} type bridge",
        f"addr add {BRIDGE_ADDRESS}/{LAB_NETWORK.prefixlen} dev {BRIDGE}",
    ]
    for i in range(guests):
        lines += [f"tuntap add {tap_name(i)} mode tap", f"link set {tap_name(i)} master {BRIDGE} up"]
    lines.append(f"link set {BRIDGE} up")
    _ip(["-n", ns, "-batch", "-"], input=("\n".join(lines) + "\n").encode())
    # no IPv6 on the lab links (as in the namespace lab); no forwarding out of the namespace
    subprocess.run(
        [
            "ip", "netns", "exec", ns, "sh", "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
            "echo 0 > /proc/sys/net/ipv4/ip_forward",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    return ns
