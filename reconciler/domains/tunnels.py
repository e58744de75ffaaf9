"""Domain `tunnels`: the private network between the hosts, and what makes it survive a reboot.

Mode ``ipip``: one IP-IP interface per peer (the seed's ``ip tunnel add ... mode ipip`` plus a
point-to-point /32), a ``Tunnel`` resource for the live kernel state and an ifupdown stanza in
``/etc/network/interfaces.d/<interface>`` for boot (Debian's default ``/etc/network/interfaces``
sources that directory; see docs/NETWORK.md for why ifupdown and not systemd-networkd).
Mode ``tunnel``: no interfaces; the host's internal /32 on ``lo`` (an ``Address`` resource plus
``/etc/network/interfaces.d/reconciler-mesh-lo``). Pure.
"""

from __future__ import annotations

import hashlib

from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host, MeshMode
from reconciler.kinds.resources import Address, Domain, FileResource, Fragment, Tunnel, Validator

INTERFACES_DIR = "/etc/network/interfaces.d"
LO_FILE = f"{INTERFACES_DIR}/reconciler-mesh-lo"
IFNAMSIZ = 15  # Linux interface names: at most 15 characters
PREFIX = "ipip-"


def tunnel_name(peer: str) -> str:
    """``ipip-<peer>`` when it fits in 15 characters; otherwise ``ipip-<first 3>_<6 hex of
    sha256(peer)>``. Host names never contain ``_``, so a shortened name can never equal a full
    one; two shortened names collide only if the hashes do (checked per host)."""
    full = PREFIX + peer
    if len(full) <= IFNAMSIZ:
        return full
    digest = hashlib.sha256(peer.encode()).hexdigest()[:6]
    return f"{PREFIX}{peer[:3]}_{digest}"


def _header(fleet: Fleet, host: Host, what: str) -> str:
    return (
        f"# Rendered by reconciler (fleet {fleet.name}) for {host.name}: {what}.\n"
        "# Local changes are reverted: edit the fleet repository instead.\n"
    )


def ifupdown_tunnel(fleet: Fleet, host: Host, peer: Host, name: str) -> str:
    return _header(fleet, host, f"IP-IP tunnel to {peer.name}") + (
        f"auto {name}\n"
        f"iface {name} inet tunnel\n"
        "    mode ipip\n"
        f"    local {host.public_address}\n"
        f"    endpoint {peer.public_address}\n"
        f"    address {host.internal_address}\n"
        "    netmask 255.255.255.255\n"
        f"    dstaddr {peer.internal_address}\n"
    )


def ifupdown_lo(fleet: Fleet, host: Host) -> str:
    return _header(fleet, host, "mesh address on lo (mesh mode tunnel)") + (
        f"iface lo inet static\n    address {host.internal_address}/32\n"
    )


def _ifup_check(interface: str) -> Validator:
    return Validator(argv=("ifup", "--no-act", "-i", "{path}", interface), needs_command="ifup")


def render(fleet: Fleet, host: Host) -> Fragment:
    peers = fleet.peers_of(host)
    if not peers:
        return Fragment()
    if fleet.mesh.mode is MeshMode.TUNNEL:
        return Fragment(
            addresses=(Address(interface="lo", address=f"{host.internal_address}/32"),),
            files=(
                FileResource(
                    path=LO_FILE,
                    content=ifupdown_lo(fleet, host).encode(),
                    domain=Domain.TUNNELS,
                    validators=(_ifup_check("lo"),),
                ),
            ),
        )
    tunnels: list[Tunnel] = []
    files: list[FileResource] = []
    seen: dict[str, str] = {}
    for peer in peers:
        name = tunnel_name(peer.name)
        if name in seen:
            raise RenderError(
                f"host {host.name}: tunnel names for peers {seen[name]} and {peer.name} collide ({name}); "
                "rename one of them (hosts[].name)"
            )
        seen[name] = peer.name
        tunnels.append(
            Tunnel(
                name=name,
                local=str(host.public_address),
                remote=str(peer.public_address),
                address=str(host.internal_address),
                peer_address=str(peer.internal_address),
                peer=peer.name,
            )
        )
        files.append(
            FileResource(
                path=f"{INTERFACES_DIR}/{name}",
                content=ifupdown_tunnel(fleet, host, peer, name).encode(),
                domain=Domain.TUNNELS,
                validators=(_ifup_check(name),),
            )
        )
    return Fragment(tunnels=tuple(tunnels), files=tuple(files))
