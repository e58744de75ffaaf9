"""The declared side: frozen, typed models of a fleet repo.

These are produced only by ``reconciler.fleet.load`` (after YAML safety checks, JSON Schema
validation and semantic checks), so every value here is already known to be valid: names are
safe for file and interface names, paths are absolute and normalised, no value holds a newline
or NUL, crypto is strong unless the host is marked legacy.

The YAML documents and their fields are described in docs/FLEET.md; field names here match the
YAML keys (snake_case).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

API_VERSION = "reconciler/v1"


def frozen_map(data: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(data or {}))


class IpsecBackend(StrEnum):
    STRONGSWAN = "strongswan"
    RACOON = "racoon"


class MeshMode(StrEnum):
    IPIP = "ipip"  # IP-IP tunnels protected by transport-mode IPsec between public addresses
    TUNNEL = "tunnel"  # no IP-IP interfaces; tunnel-mode IPsec between internal /32s


class Datapath(StrEnum):
    KERNEL = "kernel"  # kernel XFRM (ESP/AH in the kernel)
    LIBIPSEC = "libipsec"  # strongSwan userspace ESP over TUN; tunnel mode only


class MeshTrust(StrEnum):
    LEAST = "least"  # a peer reaches only the ports declared for it (role ports' sources)
    ALL = "all"  # every linked peer reaches every port of the host (the seed's trusted mesh)


class Topology(StrEnum):
    FULL = "full"  # every pair of hosts
    LINKS = "links"  # only the pairs listed in Mesh.links


class DriftMode(StrEnum):
    ENFORCE = "enforce"  # put managed files back, and alert
    REPORT = "report"  # only alert


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


# ---------------------------------------------------------------- hosts


@dataclass(frozen=True)
class SshSpec:
    user: str = "root"
    port: int = 22
    # OpenSSH public host keys ("ssh-ed25519 AAAA..."); empty means "use the known_hosts
    # file given at run time" (e.g. the lab's). Never "accept any key".
    host_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Host:
    name: str  # [a-z][a-z0-9-]{0,30}: safe for files, hostnames, interface-name suffixes
    public_address: IPv4Address
    internal_address: IPv4Address
    roles: tuple[str, ...] = ()
    ssh: SshSpec = field(default_factory=SshSpec)
    public_interface: str = "eth0"
    legacy_crypto: bool = False  # allow deprecated crypto on this host's links (with a warning)
    source_file: str = ""  # repo-relative file that declared it
    # the host's public IPv6 address, if it has one: role ports whose sources name this host
    # admit it in rules.v6, and the management-SSH lockout check covers it
    public_address_v6: IPv6Address | None = None
    # the host's IPsec stack (``ipsec:``); None: the fleet's ``mesh.backend``
    ipsec: IpsecBackend | None = None
    site: str | None = None  # the data centre / site (informational)


# ---------------------------------------------------------------- mesh


@dataclass(frozen=True)
class RacoonProposal:
    """The racoon (IKEv1) phase 1 proposal and phase 2 ``sainfo``, the seed's shape."""

    encryption_algorithm: str = "aes 256"
    hash_algorithm: str = "sha256"
    dh_group: str = "modp3072"
    lifetime_hours: int = 12
    pfs_group: str = "modp3072"
    sa_encryption_algorithm: str = "aes 256"
    sa_authentication_algorithm: str = "hmac_sha256"
    compression_algorithm: str = "deflate"
    use_ah: bool = True  # the seed's ``esp/transport//require ah/transport//require``
    exchange_mode: str = "main"  # phase 1 ``exchange_mode``: main (aggressive only for legacy hosts)


@dataclass(frozen=True)
class Lifetimes:
    ike_rekey_seconds: int = 14400  # 4 h
    child_rekey_seconds: int = 3600  # 1 h
    child_rekey_bytes: int = 0  # 0 = no byte limit


@dataclass(frozen=True)
class Mesh:
    internal_network: IPv4Network
    backend: IpsecBackend = IpsecBackend.STRONGSWAN
    mode: MeshMode = MeshMode.IPIP
    datapath: Datapath = Datapath.KERNEL
    ike_proposals: tuple[str, ...] = ("aes256gcm16-prfsha384-x25519", "aes256gcm16-prfsha384-ecp384")
    esp_proposals: tuple[str, ...] = ("aes256gcm16-x25519", "aes256gcm16-ecp384")
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    racoon: RacoonProposal = field(default_factory=RacoonProposal)
    topology: Topology = Topology.FULL
    links: tuple[tuple[str, str], ...] = ()  # unordered pairs (sorted within and across)
    dpd_seconds: int = 30
    trust: MeshTrust = MeshTrust.LEAST


# ---------------------------------------------------------------- firewall


IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True)
class ServicePort:
    """A port a role opens to some sources: networks, hosts (by name) and roles (every host
    with that role). No source at all means anyone."""

    port: int
    protocol: str = "tcp"  # tcp | udp
    sources: tuple[IPNetwork, ...] = ()  # CIDRs, IPv4 (rules.v4) or IPv6 (rules.v6)
    name: str = ""
    source_hosts: tuple[str, ...] = ()  # host names
    source_roles: tuple[str, ...] = ()  # role names

    @property
    def anyone(self) -> bool:
        return not (self.sources or self.source_hosts or self.source_roles)


@dataclass(frozen=True)
class FirewallPolicy:
    # who may reach SSH; never empty; IPv4 networks go to rules.v4, IPv6 ones to rules.v6
    management_sources: tuple[IPNetwork, ...]
    management_port: int = 22
    allow_icmp: bool = True
    log_drops: bool = False


# ---------------------------------------------------------------- AppArmor


@dataclass(frozen=True)
class MovedDirectory:
    old: str  # e.g. /var/lib/mysql
    new: str  # e.g. /data/var/mysql


@dataclass(frozen=True)
class AppArmorProfile:
    name: str  # the file name under /etc/apparmor.d, e.g. usr.sbin.mysqld
    # A full profile (written to /etc/apparmor.d/<name>) or None to only write the local
    # override /etc/apparmor.d/local/<name> (the modern way to change a packaged profile).
    content: str | None = None
    rules: tuple[str, ...] = ()  # extra rule lines for the local override
    moved_directories: tuple[MovedDirectory, ...] = ()
    source_file: str = ""


# ---------------------------------------------------------------- Apache


@dataclass(frozen=True)
class JkWorker:
    """An ``ajp13`` worker (host, port), or an ``lb`` worker balancing over ``members`` (names
    of ajp13 workers of the same site, each with its ``lbfactor``)."""

    name: str
    host: str = "127.0.0.1"
    port: int = 8009
    type: str = "ajp13"
    lbfactor: int = 1  # an ajp13 worker's share when it is a member of an lb worker
    members: tuple[str, ...] = ()  # lb only
    sticky_session: bool = True  # lb only: a session (JSESSIONID route) stays on its member


@dataclass(frozen=True)
class JkMount:
    path: str  # URL pattern, e.g. /shop/* or /shop/*.css
    worker: str


@dataclass(frozen=True)
class ExpiresRule:
    mime_type: str
    seconds: int  # becomes "A<seconds>"


@dataclass(frozen=True)
class TlsSpec:
    certificate_file: str
    key_file: str  # a path on the host; the key never leaves it
    chain_file: str | None = None
    port: int = 443


@dataclass(frozen=True)
class Site:
    name: str
    server_name: str
    aliases: tuple[str, ...] = ()
    server_admin: str = "webmaster@localhost"
    document_root: str = "/var/www/html"
    port: int = 80
    log_level: str = "warn"
    workers: tuple[JkWorker, ...] = ()
    mounts: tuple[JkMount, ...] = ()
    unmounts: tuple[JkMount, ...] = ()
    compression: tuple[str, ...] = ()  # MIME types for AddOutputFilterByType DEFLATE
    expires: tuple[ExpiresRule, ...] = ()
    unset_headers: tuple[str, ...] = ("X-Powered-By",)
    header_location: str | None = None  # LocationMatch regex for the header rules; None = whole site
    tls: TlsSpec | None = None
    source_file: str = ""


# ---------------------------------------------------------------- managed files


@dataclass(frozen=True)
class ReloadHandler:
    service: str
    command: tuple[str, ...]  # argv, e.g. ("service", "ssh", "reload")


@dataclass(frozen=True)
class ControlledDir:
    """A directory above a managed file that a non-root user controls (with those below it on
    the way to the file): the file is then written only through the no-follow walk."""

    path: str
    user: str | None = None  # None: the file's owner


@dataclass(frozen=True)
class ManagedFile:
    name: str
    path: str
    content: str | None = None  # inline content, or
    template: str | None = None  # repo-relative Jinja2 template path (content in Fleet.templates), or
    link_target: str | None = None  # a symlink to this absolute path
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False  # never stored in /etc history, never shown in diffs or mail
    validate: tuple[str, ...] = ()  # argv run on the staged file; "{path}" is replaced by its path
    reload: ReloadHandler | None = None
    source_file: str = ""
    # the Debian package this file belongs to (e.g. its config directory comes with it): it is
    # installed first (implicitly, like the domains' packages) and the file is planned after it
    package: str | None = None
    controlled_dir: ControlledDir | None = None  # see reconciler.host.pathsafe

    @property
    def controlled_by(self) -> str | None:
        """The non-root user who controls ``controlled_dir`` (None without one)."""
        if self.controlled_dir is None:
            return None
        return self.controlled_dir.user or self.owner


# ---------------------------------------------------------------- roles, drift, mail


@dataclass(frozen=True)
class Role:
    name: str
    packages: tuple[str, ...] = ()
    purge_packages: tuple[str, ...] = ()  # removed only because the fleet says so
    services: tuple[str, ...] = ()  # must be enabled and running
    # service name -> the package that brings it (``{name: mariadb, package: mariadb-server}``)
    service_packages: tuple[tuple[str, str], ...] = ()
    # installed packages apt may remove to install this role's packages (chrony replaces
    # systemd-timesyncd); any other removal apt wants is refused at plan time
    replaces: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()  # opened in the firewall
    sites: tuple[str, ...] = ()  # Site names
    apparmor: tuple[str, ...] = ()  # AppArmorProfile names
    files: tuple[str, ...] = ()  # ManagedFile names
    source_file: str = ""
    # kernel parameters, (key, value) sorted by key (reconciler.kinds.sysctl)
    sysctl: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DriftPolicy:
    paths: tuple[str, ...] = ("/etc",)
    exclude: tuple[str, ...] = ()  # glob patterns on absolute paths
    secret_paths: tuple[str, ...] = ()  # extra globs recorded by hash only
    secret_content: tuple[str, ...] = ()  # extra literal markers: a file holding one is a secret
    max_file_bytes: int = 16 * 1024 * 1024  # larger files: size, mtime, hash of first/last 64 KiB
    interval_seconds: int = 3600
    mode: DriftMode = DriftMode.REPORT


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 25
    security: SmtpSecurity = SmtpSecurity.NONE
    username_env: str | None = None  # names of environment variables, never values
    password_env: str | None = None


@dataclass(frozen=True)
class MailSettings:
    to: tuple[str, ...]
    sender: str  # YAML key "from"
    smtp: SmtpSettings = field(default_factory=SmtpSettings)


@dataclass(frozen=True)
class Notifications:
    mail: MailSettings | None = None


# ---------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Fleet:
    name: str
    mesh: Mesh
    firewall: FirewallPolicy
    hosts: tuple[Host, ...]  # sorted by name
    roles: Mapping[str, Role] = field(default_factory=lambda: MappingProxyType({}))
    sites: Mapping[str, Site] = field(default_factory=lambda: MappingProxyType({}))
    apparmor: Mapping[str, AppArmorProfile] = field(default_factory=lambda: MappingProxyType({}))
    files: Mapping[str, ManagedFile] = field(default_factory=lambda: MappingProxyType({}))
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    notifications: Notifications = field(default_factory=Notifications)
    # host name -> public key text from keys/<host>.pub (PEM for strongSwan, the ": PUB 0s..."
    # line for racoon); a host missing here has no known key yet (rendered as pending).
    public_keys: Mapping[str, str] = field(default_factory=frozen_map)
    templates: Mapping[str, str] = field(default_factory=frozen_map)  # repo path -> text
    warnings: tuple[str, ...] = ()  # e.g. legacy crypto allowed for a host
    # fleet.yaml ``id:``; "" = not pinned: reconciler.engine.identity.fleet_id derives one from the name
    id: str = ""

    @functools.cached_property
    def _hosts_by_name(self) -> Mapping[str, Host]:
        return MappingProxyType({h.name: h for h in self.hosts})

    @functools.cached_property
    def _hosts_by_role(self) -> Mapping[str, tuple[Host, ...]]:
        by: dict[str, list[Host]] = {}
        for h in self.hosts:
            for r in h.roles:
                by.setdefault(r, []).append(h)
        return MappingProxyType({r: tuple(hs) for r, hs in by.items()})

    def host(self, name: str) -> Host:
        """The host named ``name`` (KeyError if none); indexed once per Fleet (role sources
        name hosts by the hundred when a fleet is rendered)."""
        found = self._hosts_by_name.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def host_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hosts)

    def roles_of(self, host: Host) -> tuple[Role, ...]:
        return tuple(self.roles[r] for r in host.roles)

    def stack_of(self, host: Host) -> IpsecBackend:
        """The host's IPsec stack: its own ``ipsec:``, else the fleet's ``mesh.backend``."""
        return host.ipsec or self.mesh.backend

    def peers_of(self, host: Host) -> tuple[Host, ...]:
        """The hosts this host has an IPsec link with, sorted by name."""
        if self.mesh.topology is Topology.FULL:
            return tuple(h for h in self.hosts if h.name != host.name)
        linked = {b if a == host.name else a for a, b in self.mesh.links if host.name in (a, b)}
        return tuple(h for h in self.hosts if h.name in linked)

    def hosts_with_role(self, role: str) -> tuple[Host, ...]:
        """Every host that has ``role``, sorted by name."""
        return self._hosts_by_role.get(role, ())

    def link_pairs(self) -> tuple[tuple[str, str], ...]:
        """Every unordered linked pair (a < b), sorted."""
        if self.mesh.topology is Topology.FULL:
            names = self.host_names()
            return tuple((a, b) for i, a in enumerate(names) for b in names[i + 1 :])
        return tuple(sorted(tuple(sorted(p)) for p in self.mesh.links))  # type: ignore[misc]
