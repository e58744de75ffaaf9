"""The desired side: the few resource kinds a host is made of.

Domains (``reconciler.domains.*``) turn ``Fleet x Host`` into a ``Fragment`` of these; the
renderer merges fragments into one ``Desired`` per host. Everything here is plain data: the
engine decides how to observe, compare and apply each kind. Nothing here knows SSH.

Ordering: every resource carries the ``Domain`` it came from; the plan applies domains in
``Domain`` order (packages, firewall admits IKE/ESP first, then key pairs, IPsec, tunnels,
AppArmor, Apache, other files, services).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Domain(IntEnum):
    PACKAGES = 0
    FIREWALL = 10
    SYSCTL = 15  # kernel parameters (forwarding, rp_filter...) before tunnels and IPsec
    KEYS = 20
    IPSEC = 30
    TUNNELS = 40
    APPARMOR = 50
    APACHE = 60
    FILES = 70
    SERVICES = 80


@dataclass(frozen=True)
class Validator:
    """A command that must succeed before a change is swapped in.

    ``argv`` placeholders: ``{path}`` = the staged copy of the file being validated;
    ``{tree}`` = a staged copy of ``tree_root`` with every pending change applied (Apache and
    AppArmor validate the whole tree, not one file). ``env`` values may use ``{tree}`` too.
    """

    argv: tuple[str, ...]
    tree_root: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    needs_command: str | None = None  # skip with a reason when this command is absent


@dataclass(frozen=True)
class Handler:
    """How a service takes a config change: validate, then reload once per apply."""

    name: str  # e.g. "apache2", "charon", "apparmor:usr.sbin.mysqld", "iptables"
    validators: tuple[Validator, ...] = ()
    reload: tuple[str, ...] = ()  # argv; empty = nothing to reload
    # Reload only if the service is running (e.g. apache2ctl graceful on a stopped apache
    # would start it; some handlers want that, most do not).
    only_if_running: tuple[str, ...] = ()  # argv of a probe that exits 0 when running
    # The declared Service this handler reloads (Desired.services). When set, a reload finding
    # the service down starts it and proves it instead of skipping (reconciler.engine.apply): a
    # config is never put live "reloaded" into a service that is not running.
    service: str | None = None


@dataclass(frozen=True)
class FileResource:
    path: str  # absolute, normalised
    content: bytes
    domain: Domain
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False  # never shown in a diff, a log or mail; never stored in history
    handler: str | None = None  # Handler.name to validate/reload when this file changes
    validators: tuple[Validator, ...] = ()  # the file's own validate commands ({path})
    needs_package: str | None = None  # planned after that package is installed
    # a directory above ``path`` that the non-root user ``controlled_by`` controls (with those
    # below it on the way): allowed by reconciler.host.pathsafe, which then does every operation
    controlled_dir: str | None = None
    controlled_by: str | None = None


@dataclass(frozen=True)
class LinkResource:
    path: str  # the symlink
    target: str  # what it points to (as written, may be relative)
    domain: Domain
    handler: str | None = None
    needs_package: str | None = None
    controlled_dir: str | None = None  # as FileResource
    controlled_by: str | None = None


@dataclass(frozen=True)
class KeyPair:
    """A key pair made on the host when its private key is missing; the private key never
    leaves the host. ``public_path`` is what ``reconciler keys collect`` reads back."""

    name: str  # e.g. "strongswan" or "racoon"
    private_path: str
    public_path: str
    generate: tuple[tuple[str, ...], ...]  # argv list run in order on the host
    domain: Domain = Domain.KEYS
    handler: str | None = None
    needs_package: str | None = None


@dataclass(frozen=True)
class FirewallRuleset:
    """The complete iptables ruleset (``iptables-restore`` format) to be live in netfilter, and
    the ip6tables one (``rules_v6``; None: IPv6 is not managed). Both are applied under one
    dead-man switch and written to their persistent files once confirmed."""

    rules_v4: str
    persistent_path: str = "/etc/iptables/rules.v4"
    management_port: int = 22
    domain: Domain = Domain.FIREWALL
    rules_v6: str | None = None
    persistent_path_v6: str = "/etc/iptables/rules.v6"


@dataclass(frozen=True)
class Tunnel:
    """An IP-IP interface that must exist in the kernel (mode ``ipip``)."""

    name: str  # <= 15 chars, unique per host
    local: str  # own public address
    remote: str  # peer public address
    address: str  # own internal address
    peer_address: str  # peer internal address (point-to-point)
    peer: str  # peer host name
    domain: Domain = Domain.TUNNELS


@dataclass(frozen=True)
class Address:
    """An address that must be on an interface (mesh mode ``tunnel``: the host's internal /32
    on ``lo``, protected by tunnel-mode IPsec between internal /32s)."""

    interface: str  # e.g. "lo"
    address: str  # CIDR, e.g. "10.99.0.11/32"
    domain: Domain = Domain.TUNNELS


@dataclass(frozen=True)
class Package:
    name: str
    state: str = "present"  # "present" or "purged"
    domain: Domain = Domain.PACKAGES
    # installed packages apt may remove to install this one (a role's ``replaces``)
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    name: str
    running: bool = True
    enabled: bool = True
    # how to start/stop/probe it without systemd (lab hosts, containers)
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    # without systemd, "running" is read from this pid file in the observation itself (shell
    # builtins, no process started); ``status`` is the fallback when there is none
    pid_file: str | None = None
    log_path: str | None = None  # tail this when it fails to start
    needs_package: str | None = None
    domain: Domain = Domain.SERVICES
    # run after systemd started the unit, for what the packaged unit does not do itself
    # (strongSwan's starter unit loads no swanctl config); the init-script path's ``start``
    # does it already
    post_start: tuple[str, ...] = ()


@dataclass(frozen=True)
class Absent:
    """A path that must not exist: another IPsec stack's configuration on a host that switched
    stacks, a Debian default a site replaces (the global deflate.conf, the default site). The
    plan deletes it when it exists (with ``reason``), in the file transaction of ``handler``."""

    path: str
    domain: Domain
    reason: str
    handler: str | None = None


@dataclass(frozen=True)
class Expected:
    """A path the host's packages must provide for a rendered file to mean anything (the
    packaged AppArmor profile a local override extends). Missing while no package is being
    installed: a plan error naming ``reason``, nothing applied on the host."""

    path: str
    reason: str


@dataclass(frozen=True)
class Requirement:
    """Packages a part of the host cannot work without (``what``: "ipsec: racoon"). When the
    host's apt has no install candidate for one that is not installed, the plan refuses the
    whole host, before anything on it is touched (reconciler.engine.plan)."""

    what: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class SysctlSetting:
    """A kernel parameter that must have this value (``reconciler.kinds.sysctl``): written to a
    drop-in under /etc/sysctl.d (a FileResource) and loaded from it."""

    key: str  # dotted, e.g. "net.ipv4.ip_forward" (validated by the fleet schema)
    value: str  # as the kernel prints it; runs of whitespace compare equal
    domain: Domain = Domain.SYSCTL
    handler: str | None = None  # the handler that loads the drop-in


@dataclass(frozen=True)
class Pending:
    """Something that cannot be rendered yet, with the reason (e.g. a peer's key unknown)."""

    domain: Domain
    subject: str  # e.g. "ipsec peer web2"
    reason: str


@dataclass(frozen=True)
class Resources:
    """The resources of one host, by kind: what a domain renders (``Fragment``) and what the
    merge of every domain's fragment holds (``Desired``)."""

    files: tuple[FileResource, ...] = ()
    links: tuple[LinkResource, ...] = ()
    keypairs: tuple[KeyPair, ...] = ()
    handlers: tuple[Handler, ...] = ()
    firewall: FirewallRuleset | None = None
    tunnels: tuple[Tunnel, ...] = ()
    packages: tuple[Package, ...] = ()
    services: tuple[Service, ...] = ()
    pending: tuple[Pending, ...] = ()
    addresses: tuple[Address, ...] = ()  # kernel addresses (added for mesh mode ``tunnel``)
    # CHILD_SAs this host starts actively (libipsec has no trap policies): an established
    # mesh is observed state, so a child that is down is planned to be initiated again
    initiate: tuple[str, ...] = ()
    # absolute directories whose files the domain fully owns: files there that are not
    # rendered are pruned (e.g. /etc/swanctl/conf.d)
    owned_dirs: tuple[str, ...] = ()
    absent: tuple[Absent, ...] = ()  # paths that must not exist
    requires: tuple[Requirement, ...] = ()
    expects: tuple[Expected, ...] = ()
    sysctl: tuple[SysctlSetting, ...] = ()  # kernel parameters (reconciler.kinds.sysctl)


@dataclass(frozen=True)
class Fragment(Resources):
    """What one domain renders for one host."""


@dataclass(frozen=True)
class Desired(Resources):
    """Everything one host should be, merged from every domain, sorted deterministically
    (each tuple sorted by its resource's name, path or key)."""

    host: str = field(kw_only=True)
    warnings: tuple[str, ...] = field(default=(), kw_only=True)

    def handler(self, name: str) -> Handler:
        for h in self.handlers:
            if h.name == name:
                return h
        raise KeyError(name)
