"""Root-namespace networking of a lab: one bridge (192.0.2.254/24), one veth per host, the
hosts' network namespaces, and (only when the root firewall would filter bridged frames) one
narrowly scoped FORWARD accept rule for traffic from the lab bridge to the lab bridge (IPv4,
and IPv6 when bridged IPv6 frames pass ip6tables).

IPv6: the hosts have IPv6 addresses from the documentation prefix 2001:db8::/64 (set up inside
each host by its init script); the bridge and the veths in the root namespace keep IPv6 off, so
the machine takes no part: IPv6 only flows between lab hosts, and none of them has a route out.

Every name starts with the lab's prefix; removal touches only recorded or prefixed names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from reconciler.lab import limits
from reconciler.lab.model import BRIDGE_ADDRESS, LAB_NETWORKS, LabError, network_of
from reconciler.lab.state import PREFIX_RE
from reconciler.log import get_logger

log = get_logger(__name__)


# a Linux bridge has at most 1024 ports (BR_MAX_PORTS); past this many hosts the lab adds a
# bridge, joined to the first one by a veth pair (one broadcast domain, a star: no loop)
# (``RECONCILER_LAB_PORTS_PER_BRIDGE`` lowers it: tests build a many-bridge lab from a few hosts)
PORTS_PER_BRIDGE = 1000


def ports_per_bridge() -> int:
    try:
        return max(1, min(PORTS_PER_BRIDGE, int(os.environ.get("RECONCILER_LAB_PORTS_PER_BRIDGE", ""))))
    except ValueError:
        return PORTS_PER_BRIDGE


def bridge_name(prefix: str, index: int = 0) -> str:
    """The lab's first bridge (holding the lab's addresses) is ``<prefix>br``; extra bridges
    for big labs are ``<prefix>b<k>``."""
    return f"{prefix}br" if index == 0 else f"{prefix}b{index}"


def bridges_needed(hosts: int, ports_per_bridge: int = PORTS_PER_BRIDGE) -> int:
    return max(1, -(-hosts // ports_per_bridge))


def uplink_names(prefix: str, index: int) -> tuple[str, str]:
    """The veth pair joining bridge ``index`` (>0) to the first bridge: (first side, its side)."""
    return f"{prefix}x{index}", f"{prefix}y{index}"


def veth_name(prefix: str, index: int) -> str:
    return f"{prefix}h{index}"


def peer_name(prefix: str, index: int) -> str:
    return f"{prefix}p{index}"


def netns_name(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"


def _run(
    argv: Sequence[str], *, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc


def ip_batch(lines: Sequence[str], *, force: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run many `ip` commands in one process (names are ours, validated, never user text)."""
    argv = ["ip", "-force", "-batch", "-"] if force else ["ip", "-batch", "-"]
    return _run(argv, input=("\n".join(lines) + "\n").encode(), check=not force)


def _set_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError:
        pass


def address_in_use() -> str | None:
    """'ADDRESS on IFACE' when a bridge address of the lab (192.0.2.254, 198.19.255.254) is
    already on an interface of the root namespace that is not a lab's, else None."""
    bridges = {str(b) for _, b in LAB_NETWORKS}
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout.decode()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].split("/")[0] in bridges and not _is_lab_link(parts[1]):
            return f"{parts[3].split('/')[0]} on {parts[1]}"
    return None


# An address on the lab network that no host ever takes: routed into the bridge while a lab is
# up, so a connection to it stays on the lab and times out (nobody answers ARP). Tests of an
# unreachable host use it; it never leaves the machine through the uplink.
VOID_ADDRESS = "192.0.2.250"


def create_lines(
    prefix: str, hosts: Sequence[tuple[str, int, str]], ports_per_bridge: int = PORTS_PER_BRIDGE
) -> tuple[list[str], list[str]]:
    """The two ``ip -batch`` scripts that build a lab's network (pure, for tests): first the
    bridges, their uplinks and every netns and veth pair; then (after IPv6 is turned off on the
    root-namespace side) everything enslaved and up, and the routes."""
    n_bridges = bridges_needed(len(hosts), ports_per_bridge)
    br = bridge_name(prefix)
    # noprefixroute + one /32 route per host: the machine's own uplink may sit on 192.0.2.0/24
    # too (it does on the project machine), and a /24 route on the bridge would lose to it;
    # /32 routes win, so traffic for a lab host never leaves through the uplink.
    first = [f"link add {bridge_name(prefix, k)} type bridge" for k in range(n_bridges)]
    first += [f"addr add {b}/{n.prefixlen} dev {br} noprefixroute" for n, b in LAB_NETWORKS]
    for k in range(1, n_bridges):
        a, b = uplink_names(prefix, k)
        first.append(f"link add {a} type veth peer name {b}")
    for host, i, _ in hosts:
        ns = netns_name(prefix, host)
        first += [
            f"netns add {ns}",
            f"link add {veth_name(prefix, i)} type veth peer name {peer_name(prefix, i)} netns {ns}",
        ]
    second = []
    for k in range(1, n_bridges):
        a, b = uplink_names(prefix, k)
        second += [f"link set {a} master {br} up", f"link set {b} master {bridge_name(prefix, k)} up"]
    for _, i, _ in hosts:
        master = bridge_name(prefix, i // ports_per_bridge)
        second.append(f"link set {veth_name(prefix, i)} master {master} up")
    second += [f"link set {bridge_name(prefix, k)} up" for k in range(n_bridges)]
    second += [f"route replace {addr}/32 dev {br} src {network_of(addr)[1]}" for _, _, addr in hosts]
    second.append(f"route replace {VOID_ADDRESS}/32 dev {br} src {BRIDGE_ADDRESS}")
    return first, second


def create(prefix: str, hosts: Sequence[tuple[str, int, str]]) -> None:
    """Create the bridge(s), and for each (host name, index, address) a netns, a veth pair and a
    /32 route in the root namespace."""
    first, second = create_lines(prefix, hosts, ports_per_bridge())
    ip_batch(first)
    for name in [line.split()[2] for line in first if line.startswith("link add ")]:
        _set_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    ip_batch(second)


def reserved_addresses() -> dict[str, str]:
    """Addresses of the lab networks (192.0.2.0/24, 198.18.0.0/15) the machine itself uses
    outside any lab (its own addresses, gateways): a lab host must not take them. Maps address
    -> what uses it."""
    found: dict[str, str] = {}
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout.decode()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and not _is_lab_link(parts[1]):
            addr = parts[3].split("/")[0]
            if _in_lab_networks(addr):
                found[addr] = f"address of {parts[1]}"
    routes = _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.decode()
    for line in routes.splitlines():
        words = line.split()
        if "via" in words:
            gw = words[words.index("via") + 1]
            if _in_lab_networks(gw):
                found[gw] = "a gateway of the machine"
    return found


def _in_lab_networks(address: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return any(addr in net for net, _ in LAB_NETWORKS)


# the root-namespace links of a lab: bridges (br, b<k>), host veths (h<n>), bridge uplinks (x<k>, y<k>)
_LINK_KINDS = r"(br|[hbxy]\d+)"


def _is_lab_link(name: str) -> bool:
    return re.match(rf"^rcl[a-z0-9]{{1,5}}?{_LINK_KINDS}(@.*)?$", name) is not None


# ------------------------------------------------------------------ root firewall


IP6 = "ip6tables"  # first word of a recorded IPv6 rule (an IPv4 rule starts with its chain)


def _bridge_filtered(family: str = "iptables") -> bool:
    try:
        if Path(f"/proc/sys/net/bridge/bridge-nf-call-{family}").read_text().strip() == "1":
            return True
    except OSError:
        pass
    return False


def forward_rule(prefix: str) -> list[str]:
    br = bridge_name(prefix)
    return [
        "FORWARD",
        "-i",
        br,
        "-o",
        br,
        "-m",
        "comment",
        "--comment",
        f"reconciler-lab {prefix}",
        "-j",
        "ACCEPT",
    ]


def allow_forward(prefix: str) -> list[list[str]]:
    """Add the bridge accept rule if bridged frames pass a FORWARD chain that could drop them
    (IPv4; IPv6 recorded as ``["ip6tables", *rule]``)."""
    added: list[list[str]] = []
    for tool in ("iptables", IP6):
        if not _bridge_filtered(tool):
            continue
        proc = _run([tool, "-w", "5", "-S", "FORWARD"], check=False)
        if proc.returncode != 0:
            continue
        rules = proc.stdout.decode().splitlines()
        policy_accept = "-P FORWARD ACCEPT" in rules
        if policy_accept and len(rules) == 1:
            continue  # nothing could drop a frame: add nothing
        rule = forward_rule(prefix)
        _run([tool, "-w", "5", "-I", *rule])
        log.info("lab.firewall.rule_added", prefix=prefix, tool=tool)
        added.append(rule if tool == "iptables" else [IP6, *rule])
    return added


def remove_forward(prefix: str, recorded: Sequence[Sequence[str]]) -> None:
    """Remove recorded rules, and any rule carrying this prefix's comment (crash leftovers)."""
    for rule in recorded:
        if rule and rule[0] == IP6:
            _run([IP6, "-w", "5", "-D", *rule[1:]], check=False)
        else:
            _run(["iptables", "-w", "5", "-D", *rule], check=False)
    tag = f'"reconciler-lab {prefix}"'
    for tool in ("iptables", IP6):
        proc = _run([tool, "-w", "5", "-S", "FORWARD"], check=False)
        for _ in range(10):
            if proc.returncode != 0 or tag not in proc.stdout.decode():
                break
            _run([tool, "-w", "5", "-D", *forward_rule(prefix)], check=False)
            proc = _run([tool, "-w", "5", "-S", "FORWARD"], check=False)


# ------------------------------------------------------------------ discovery and removal


def list_netns() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.decode().splitlines() if line.strip()]


def list_links() -> list[str]:
    proc = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in proc.stdout.decode().splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def netns_of(prefix: str) -> list[str]:
    return [n for n in list_netns() if n.startswith(prefix + "-")]


def links_of(prefix: str) -> list[str]:
    pat = re.compile(rf"^{re.escape(prefix)}{_LINK_KINDS}$")
    return [n for n in list_links() if pat.match(n)]


def all_prefixes_in_kernel() -> set[str]:
    found: set[str] = set()
    for ns in list_netns():
        head = ns.split("-", 1)[0]
        if "-" in ns and PREFIX_RE.match(head):
            found.add(head)
    for link in list_links():
        m = re.match(rf"^(rcl[a-z0-9]{{1,5}}?){_LINK_KINDS}$", link)
        if m and PREFIX_RE.match(m.group(1)):
            found.add(m.group(1))
    return found


def remove(prefix: str, netns: Sequence[str] = ()) -> None:
    """Delete this prefix's netns (recorded and discovered) and links. Errors are ignored:
    removal is idempotent; what is left is reported by the caller's final check."""
    names = sorted(set(netns) | set(netns_of(prefix)))
    links = links_of(prefix)
    lines = [f"netns del {n}" for n in names]
    bridge = re.compile(rf"^{re.escape(prefix)}(br|b\d+)$")
    lines += [f"link del {link}" for link in links if not bridge.match(link)]
    lines += [f"link del {link}" for link in links if bridge.match(link)]
    if lines:
        ip_batch(lines, force=True)


# ---------------------------------------------------------------- the shared neighbour table

NEIGH_DIR = Path("/proc/sys/net/ipv4/neigh/default")
NEIGH_KEYS = ("gc_thresh2", "gc_thresh3")


def neigh_entries_needed(hosts: int) -> int:
    """ARP entries a lab of ``hosts`` can hold at once: every host resolves every other host and
    the bridge address, the root namespace resolves every host; plus room for the machine."""
    return hosts * (hosts + 1) + 256


def raise_neigh_table(hosts: int, root: Path = NEIGH_DIR) -> dict[str, list[int]]:
    """Make the kernel's IPv4 neighbour table big enough for a full mesh of ``hosts``.

    The table is ONE for the whole machine, shared by every network namespace, with a hard cap
    (``gc_thresh3``, 1024 by default). A 50-host mesh needs ~2,500 entries; past the cap the
    kernel refuses new neighbours ("neighbor table overflow!" in dmesg) and drops the packets
    that needed them with ENOBUFS, which UDP senders never see (charon logs "sending packet"
    and retransmits into the void; UdpSndbufErrors grows). Only ever raises the limits; returns
    ``{key: [old, new]}`` for the keys changed, so lab down can put the old values back."""
    need = neigh_entries_needed(hosts)
    return limits.raise_values({"gc_thresh2": need, "gc_thresh3": 2 * need}, root, "lab.neigh")


def restore_neigh_table(recorded: dict[str, list[int]], root: Path = NEIGH_DIR) -> None:
    """Put back the limits ``raise_neigh_table`` changed, unless someone changed them since."""
    limits.restore_values(recorded, NEIGH_KEYS, root)
