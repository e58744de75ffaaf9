"""Who may reach which role port of a host: the roles' port ``sources`` resolved. Pure.

A port's sources are networks (IPv4 for rules.v4, IPv6 for rules.v6), host names and role
names (every host with that role); no source at all means anyone. The firewall domain renders
rules from this, and ``verify`` uses the same answer to decide which peer must reach a port
over the mesh and which must be refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from reconciler.fleet.model import Fleet, Host, IPNetwork, MeshTrust


@dataclass(frozen=True)
class PortAccess:
    """One port of a host (merged over its roles) and who may reach it."""

    protocol: str  # tcp | udp
    port: int
    names: tuple[str, ...]  # the ports' names in the roles, for comments
    anyone: bool  # a role opens it to everyone
    hosts: tuple[str, ...]  # source hosts (named, or by role), sorted; never the host itself
    networks: tuple[IPNetwork, ...]  # source networks, in declaration order

    @property
    def networks_v4(self) -> tuple[IPv4Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv4Network))

    @property
    def networks_v6(self) -> tuple[IPv6Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, IPv6Network))

    @property
    def label(self) -> str:
        return f"{self.port}/{self.protocol}" + (f" ({', '.join(self.names)})" if self.names else "")


def port_access(fleet: Fleet, host: Host) -> tuple[PortAccess, ...]:
    """Every role port of ``host``, one per (protocol, port), sorted by port then protocol."""
    merged: dict[tuple[str, int], tuple[list[str], list[bool], dict[str, None], list[IPNetwork]]] = {}
    for role in fleet.roles_of(host):
        for sp in role.ports:
            names, anyone, hosts, nets = merged.setdefault((sp.protocol, sp.port), ([], [], {}, []))
            if sp.name and sp.name not in names:
                names.append(sp.name)
            if sp.anyone:
                anyone.append(True)
            for h in sp.source_hosts:
                hosts[h] = None
            for r in sp.source_roles:
                for h2 in fleet.hosts_with_role(r):
                    hosts[h2.name] = None
            nets += [n for n in sp.sources if n not in nets]
    out = [
        PortAccess(
            protocol=proto,
            port=port,
            names=tuple(names),
            anyone=bool(anyone),
            hosts=tuple(sorted(h for h in hosts if h != host.name)),
            networks=tuple(nets),
        )
        for (proto, port), (names, anyone, hosts, nets) in merged.items()
    ]
    return tuple(sorted(out, key=lambda a: (a.port, a.protocol)))


def mesh_admits(fleet: Fleet, peer: Host, access: PortAccess) -> bool:
    """Does the firewall admit ``peer``'s mesh traffic (from its internal address, protected)
    to this port? With ``mesh.trust: all`` every peer reaches every port."""
    if fleet.mesh.trust is MeshTrust.ALL or access.anyone or peer.name in access.hosts:
        return True
    return any(peer.internal_address in n for n in access.networks_v4)


def management_admits(fleet: Fleet, peer: Host) -> bool:
    """Is ``peer``'s internal address among the management sources (or the mesh fully
    trusted)? Then its mesh traffic reaches the management SSH port."""
    if fleet.mesh.trust is MeshTrust.ALL:
        return True
    return any(
        isinstance(n, IPv4Network) and peer.internal_address in n for n in fleet.firewall.management_sources
    )
