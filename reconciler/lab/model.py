"""Typed values of the lab: what to build (specs) and what was built (hosts, info)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import ReconcilerError

if TYPE_CHECKING:
    from reconciler.fleet.model import Fleet

LAB_NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
BRIDGE_ADDRESS = ipaddress.IPv4Address("192.0.2.254")
# big labs (``lab up --hosts N``): RFC 2544's benchmarking block, never routed, room for
# 131,000 hosts; the bridge holds its last usable address. The documentation /24 above stays
# for fleets that name 192.0.2.x addresses (the example fleet, ``lab up --fleet``).
BIG_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
BIG_BRIDGE_ADDRESS = ipaddress.IPv4Address("198.19.255.254")
# (network, the bridge's address on it): every address a lab host may take is in one of these
LAB_NETWORKS = ((LAB_NETWORK, BRIDGE_ADDRESS), (BIG_NETWORK, BIG_BRIDGE_ADDRESS))
NETS = LAB_NETWORKS
# the first host address of a ``--hosts N`` lab: lab1 = 198.18.0.11, lab2 = 198.18.0.12, ...
BIG_FIRST_HOST = 11
# IPv6 of the lab hosts (a documentation prefix, RFC 3849): on the bridge only, between the hosts;
# the root namespace takes no IPv6 part in the lab and no host has an IPv6 route out
LAB_NETWORK_V6 = ipaddress.IPv6Network("2001:db8::/64")


def network_of(address: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    """The lab network holding ``address`` and the bridge's address on it (LabError if none)."""
    addr = ipaddress.IPv4Address(address)
    for net, bridge in LAB_NETWORKS:
        if addr in net:
            return net, bridge
    raise LabError(f"address {address} must be in {' or '.join(str(n) for n, _ in LAB_NETWORKS)}")


def big_address(index: int) -> str:
    """The address of the ``index``-th (from 0) host of a ``--hosts N`` lab."""
    addr = BIG_NETWORK.network_address + BIG_FIRST_HOST + index
    if addr >= BIG_BRIDGE_ADDRESS:
        raise LabError(f"a lab has room for {int(BIG_BRIDGE_ADDRESS) - int(addr) + index} hosts")
    return str(addr)


def default_v6(address: str) -> str:
    """A lab host's IPv6 address unless the fleet gives one: 192.0.2.N -> 2001:db8::N (N in
    decimal digits, read as hex: 192.0.2.11 -> 2001:db8::11); 198.18.0.0 + K ->
    2001:db8::1:0:0 + K (198.18.0.11 -> 2001:db8::1:0:b). Unique within the lab."""
    addr = ipaddress.IPv4Address(address)
    if addr in BIG_NETWORK:
        offset = int(addr) - int(BIG_NETWORK.network_address)
        return str(ipaddress.IPv6Address(int(LAB_NETWORK_V6.network_address) + (1 << 32) + offset))
    last = address.rsplit(".", 1)[-1]
    return str(ipaddress.IPv6Address(f"2001:db8::{last}"))


_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class LabError(ReconcilerError):
    """The lab could not be built, found or removed; the message says what and why."""


@dataclass(frozen=True)
class LabHostSpec:
    """One host to build: its name (also its hostname), its public address and its IPv6
    address (``default_v6(address)`` when not given)."""

    name: str
    address: str
    address_v6: str = ""

    def __post_init__(self) -> None:
        if not _HOST_NAME.match(self.name):
            raise LabError(f"lab host name {self.name!r}: must match [a-z][a-z0-9-]{{0,30}}")
        try:
            addr = ipaddress.IPv4Address(self.address)
        except ValueError as exc:
            raise LabError(f"lab host {self.name}: address {self.address!r} is not IPv4") from exc
        nets = " or ".join(
            f"{n} (not {n.network_address}, {b} or {n.broadcast_address})" for n, b in LAB_NETWORKS
        )
        try:
            net, bridge = network_of(self.address)
        except LabError:
            raise LabError(f"lab host {self.name}: address {self.address} must be in {nets}") from None
        if addr in (bridge, net.network_address, net.broadcast_address):
            raise LabError(f"lab host {self.name}: address {self.address} must be in {nets}")
        if not self.address_v6:
            object.__setattr__(self, "address_v6", default_v6(self.address))
        try:
            v6 = ipaddress.IPv6Address(self.address_v6)
        except ValueError as exc:
            raise LabError(f"lab host {self.name}: address {self.address_v6!r} is not IPv6") from exc
        if v6 not in LAB_NETWORK_V6 or v6 == LAB_NETWORK_V6.network_address:
            raise LabError(f"lab host {self.name}: IPv6 address {v6} must be in {LAB_NETWORK_V6} (not ::)")
        object.__setattr__(self, "address_v6", str(v6))


@dataclass(frozen=True)
class LabHost:
    """A running lab host.

    ``pid`` is the ``unshare`` process (SIGKILL it to stop the host); ``init_pid`` is its child,
    PID 1 of the host (sshd), the target for ``nsenter``. ``root`` is the host's state directory
    (``upper/`` holds every file the host changed, ``home-root/`` is its /root).
    """

    name: str
    address: str
    netns: str
    pid: int
    root: Path
    init_pid: int = 0
    veth: str = ""


@dataclass(frozen=True)
class LabFleet:
    """The fleet a lab was made for (``lab up --fleet REPO``): its name and fleet id."""

    name: str
    id: str

    @classmethod
    def of(cls, fleet: Fleet) -> LabFleet:
        from reconciler.engine.identity import fleet_id

        return cls(name=str(fleet.name), id=fleet_id(fleet))

    def describe(self) -> str:
        return f"fleet '{self.name}' (id {self.id})"


@dataclass(frozen=True)
class LabInfo:
    """Where a lab's files are; enough for the engine to reach every host with strict keys."""

    prefix: str
    state_dir: Path
    known_hosts: Path
    client_key: Path
    hosts: tuple[LabHost, ...]
    bridge: str = ""
    kind: str = "netns"  # "netns": hosts in namespaces; "vm": QEMU guests (docs/LAB.md)
    # a VM lab's hosts are reached from inside this network namespace (SshTarget.netns)
    ssh_netns: str = ""
    fleet: LabFleet | None = None  # None: made for no fleet (``lab up --hosts N``)

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)
