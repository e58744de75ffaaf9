"""Whom the reconciler dials: one ``SshTarget`` per fleet host (address, port, user, the fleet's
host keys) with the run-time known_hosts file and client keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol


@dataclass(frozen=True)
class SshTarget:
    host: str  # fleet host name (used in messages)
    address: str  # what we connect to
    port: int = 22
    user: str = "root"
    host_keys: tuple[str, ...] = ()  # from the fleet ("ssh-ed25519 AAAA...")
    known_hosts: str | None = None  # path of a known_hosts file, e.g. the lab's
    client_keys: tuple[str, ...] = ()  # private key paths; empty = asyncssh defaults/agent
    local: bool = False  # the machine the reconciler runs on: no SSH (LocalConnection)
    netns: str | None = None  # reach the host from inside this network namespace (the lab's VMs)

    def where(self) -> str:
        return f"{self.host} ({self.address}:{self.port})"


class _SshSpec(Protocol):  # the part of reconciler.fleet.model.SshSpec we read
    @property
    def user(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def host_keys(self) -> Sequence[str]: ...


class _Host(Protocol):  # the part of reconciler.fleet.model.Host we read
    @property
    def name(self) -> str: ...
    @property
    def public_address(self) -> IPv4Address: ...
    @property
    def ssh(self) -> _SshSpec: ...


class _Fleet(Protocol):  # the part of reconciler.fleet.model.Fleet we read (host/ imports no fleet/)
    @property
    def hosts(self) -> Sequence[_Host]: ...


def targets_for(
    fleet: _Fleet,
    *,
    known_hosts: str | None,
    client_keys: Sequence[str],
    address_override: Mapping[str, str] | None = None,
    local_hosts: Sequence[str] = (),
    netns: str | None = None,
) -> dict[str, SshTarget]:
    """One SshTarget per fleet host: fleet address/port/user/host keys, plus the run-time
    known_hosts file and client keys. ``address_override`` maps host name -> address to dial;
    hosts in ``local_hosts`` are the machine the reconciler runs on (no SSH); ``netns``: dial
    every host from inside that network namespace (``/run/netns/NAME``, the lab's VM network)."""
    override = dict(address_override or {})
    out: dict[str, SshTarget] = {}
    for h in fleet.hosts:
        out[h.name] = SshTarget(
            host=h.name,
            address=override.get(h.name, str(h.public_address)),
            port=int(h.ssh.port),
            user=str(h.ssh.user),
            host_keys=tuple(h.ssh.host_keys),
            known_hosts=known_hosts,
            client_keys=tuple(client_keys),
            local=h.name in local_hosts,
            netns=netns or None,
        )
    return out


# ---------------------------------------------------------------- host keys
