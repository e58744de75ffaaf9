"""Test fleets for the network domains, built directly from the model dataclasses.

``example_fleet()`` mirrors fleet-repo-example (4 hosts web1/web2/db1/db2 on 192.0.2.11/12/21/22,
10.99.0.11/12/21/22 and 2001:db8::11/12/21/22, roles web and db (MySQL from role web only),
management from 192.0.2.254/32 and 198.51.100.0/24),
with the public keys in tests/fixtures/keys/<backend>/ (real keys made once with openssl;
only the public halves are committed).
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from types import MappingProxyType

from reconciler.fleet.model import (
    Datapath,
    FirewallPolicy,
    Fleet,
    Host,
    IpsecBackend,
    Mesh,
    MeshMode,
    Role,
    ServicePort,
    frozen_map,
)

KEYS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "keys"
HOSTS = (("db1", 21), ("db2", 22), ("web1", 11), ("web2", 12))


def fixture_keys(backend: IpsecBackend, names: tuple[str, ...] | None = None) -> dict[str, str]:
    folder = KEYS_DIR / backend.value
    wanted = names if names is not None else tuple(n for n, _ in HOSTS)
    return {n: (folder / f"{n}.pub").read_text() for n in wanted}


def make_host(name: str, last: int, roles: tuple[str, ...], **kw: object) -> Host:
    return Host(
        name=name,
        public_address=IPv4Address(f"192.0.2.{last}"),
        internal_address=IPv4Address(f"10.99.0.{last}"),
        public_address_v6=IPv6Address(f"2001:db8::{last}"),
        roles=roles,
        source_file=f"hosts/{name}.yaml",
        **kw,  # type: ignore[arg-type]
    )


def example_fleet(
    *,
    backend: IpsecBackend = IpsecBackend.STRONGSWAN,
    mode: MeshMode = MeshMode.IPIP,
    datapath: Datapath = Datapath.KERNEL,
    keys: bool | tuple[str, ...] = True,
) -> Fleet:
    roles = {
        "db": Role(
            name="db",
            ports=(ServicePort(port=3306, protocol="tcp", source_roles=("web",), name="mysql"),),
            source_file="roles/db.yaml",
        ),
        "web": Role(
            name="web",
            packages=("curl",),
            ports=(ServicePort(port=80, name="http"), ServicePort(port=443, name="https")),
            source_file="roles/web.yaml",
        ),
    }
    hosts = tuple(make_host(n, last, ("db",) if n.startswith("db") else ("web",)) for n, last in HOSTS)
    if keys is True:
        public_keys = fixture_keys(backend)
    elif keys is False:
        public_keys = {}
    else:
        public_keys = fixture_keys(backend, keys)
    return Fleet(
        name="example",
        mesh=Mesh(
            internal_network=IPv4Network("10.99.0.0/24"), backend=backend, mode=mode, datapath=datapath
        ),
        firewall=FirewallPolicy(
            management_sources=(IPv4Network("192.0.2.254/32"), IPv4Network("198.51.100.0/24")),
            management_port=22,
        ),
        hosts=hosts,
        roles=MappingProxyType(roles),
        public_keys=frozen_map(public_keys),
    )


# name -> fleet, for golden files and real-tool checks
VARIANTS: dict[str, Fleet] = {
    "strongswan-ipip-kernel": example_fleet(),
    "strongswan-tunnel-kernel": example_fleet(mode=MeshMode.TUNNEL),
    "strongswan-tunnel-libipsec": example_fleet(mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC),
    "racoon-ipip": example_fleet(backend=IpsecBackend.RACOON),
}


def with_hosts(fleet: Fleet, hosts: tuple[Host, ...]) -> Fleet:
    return replace(fleet, hosts=tuple(sorted(hosts, key=lambda h: h.name)))
