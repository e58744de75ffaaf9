"""The observed side: what a host really is, parsed into typed models.

``reconciler.engine.observe`` builds one script per host, runs it in one round trip, splits its framed
output and parses each part into these. ``reconciler.engine.plan`` compares them with ``Desired``.
Raw text is kept only where a diff must be shown; comparisons use the canonical forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from reconciler.host.identity import SeenIdentity
from reconciler.kinds.aptsim import AptSimulation


@dataclass(frozen=True)
class FileState:
    path: str
    exists: bool
    kind: str = "file"  # "file", "link", "dir", "other"
    sha256: str | None = None  # of the content, for regular files
    mode: int | None = None  # permission bits (e.g. 0o644)
    owner: str | None = None
    group: str | None = None
    link_target: str | None = None  # for symlinks (readlink, as written)
    content: bytes | None = None  # fetched only when the hash differs (second round trip)
    uid: int | None = None  # numeric owner (the directory policy of reconciler.host.pathsafe)
    # why the path must not be touched: a directory above it is a link, not root's alone, ...
    # (reconciler.host.pathsafe); nothing was read through it; plan shows this, apply refuses it
    refused: str | None = None


@dataclass(frozen=True)
class IptablesState:
    """``iptables-save`` output canonicalised: per table, the chain policies and the rules in
    order, each rule normalised (counters dropped, option order as iptables-save prints it)."""

    tables: Mapping[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = field(
        default_factory=lambda: MappingProxyType({})
    )  # table -> ((chain, policy)...), (rule lines "-A CHAIN ...",...)
    raw: str = ""


@dataclass(frozen=True)
class LinkState:
    name: str
    kind: str  # "ipip", "veth", "tun", ...
    local: str | None = None
    remote: str | None = None
    addresses: tuple[str, ...] = ()  # "10.99.0.11/32 peer 10.99.0.12/32" style, canonical
    up: bool = False


@dataclass(frozen=True)
class XfrmPolicy:
    src: str
    dst: str
    dir: str  # in | out | fwd
    proto: str | None = None  # upper-layer protocol selector (e.g. "ipencap")
    tmpl: tuple[str, ...] = ()  # e.g. ("esp/transport", "ah/transport")


@dataclass(frozen=True)
class IpsecState:
    daemon_running: bool = False
    loaded_connections: tuple[str, ...] = ()  # swanctl --list-conns names
    established_ike: tuple[str, ...] = ()  # connection names with an ESTABLISHED IKE_SA
    installed_children: tuple[str, ...] = ()  # child names with INSTALLED CHILD_SAs
    policies: tuple[XfrmPolicy, ...] = ()


@dataclass(frozen=True)
class PackageState:
    name: str
    installed: bool
    version: str | None = None


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    enabled: bool | None = None  # None when the manager cannot tell (no systemd)


@dataclass(frozen=True)
class Observed:
    host: str
    files: Mapping[str, FileState] = field(default_factory=lambda: MappingProxyType({}))
    iptables: IptablesState | None = None
    ip6tables: IptablesState | None = None  # ip6tables-save, when the firewall manages IPv6
    links: tuple[LinkState, ...] = ()
    ipsec: IpsecState = field(default_factory=IpsecState)
    packages: Mapping[str, PackageState] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, ServiceState] = field(default_factory=lambda: MappingProxyType({}))
    init_system: str = "unknown"  # "systemd" or "sysv" (PID 1 is not systemd)
    inventory: tuple[str, ...] = ()  # paths this reconciler managed before (for prune)
    # e.g. {"ipip": False}; "ipv6": False when the kernel has no IPv6 (no rules.v6 to load)
    kernel: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    errors: tuple[str, ...] = ()  # parts of the observation that failed, with the reason
    # handlers whose new files went live but whose reload never ran (an apply interrupted between
    # swap and reload: /var/lib/reconciler/pending-reloads); plan reloads those still desired
    pending_reloads: tuple[str, ...] = ()
    # /etc/reconciler/identity as the observation saw it (None: not observed); see reconciler.host.identity
    identity: SeenIdentity | None = None
    # declared non-root owners/groups the host does not know (plan refuses those files)
    # packages a Requirement names that are not installed: apt's install candidate, "" = none
    # (apt-cache policy; observed only for those, so the no-op path runs no apt-cache)
    candidates: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    unknown_users: frozenset[str] = frozenset()
    unknown_groups: frozenset[str] = frozenset()
    # live kernel parameters the Desired declares (reconciler.kinds.sysctl): key -> value as
    # ``sysctl`` prints it; a key the kernel does not have is absent; None: not observed
    sysctl: Mapping[str, str] | None = None
    # apt's solution for the planned package transaction (``apt-get -s``), asked only when the
    # plan has package actions (reconciler.kinds.aptsim); None: not asked
    apt: AptSimulation | None = None
