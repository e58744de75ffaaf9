"""Checks across documents, then the Fleet.

Runs on schema-valid documents and collects every problem (never stops at the first): unique
names and addresses, references, links, address plans, paths, crypto policy (with the
``legacy_crypto`` escape hatch), keys, one-line values. Warnings are ``Problem``s with
``severity="warning"``; they end up in ``Fleet.warnings`` when the fleet is valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from types import MappingProxyType
from typing import Any, TypeVar

from reconciler.errors import Problem
from reconciler.fleet import build, crypto
from reconciler.fleet import model as m
from reconciler.fleet.keys import KeyFileError, PublicKey, parse_public_key, weaknesses
from reconciler.fleet.yamlsafe import Path, YamlDocument, format_path

T = TypeVar("T")

# Fields whose value is a whole file: they may hold newlines and tabs, never NUL.
MULTILINE_FIELDS: Mapping[str, frozenset[Path]] = {
    "ManagedFile": frozenset({("content",)}),
    "AppArmorProfile": frozenset({("content",)}),
}

_CHAR_NAMES = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL character", "\t": "a tab"}


@dataclass
class Sources:
    """What the loader hands over: schema-valid documents by kind, and the rest of the repo."""

    fleet: YamlDocument | None = None
    docs: dict[str, list[YamlDocument]] = field(default_factory=dict)  # kind -> valid documents
    parsed: list[tuple[str, YamlDocument]] = field(default_factory=list)  # every parsed document
    broken: dict[str, set[str]] = field(default_factory=dict)  # kind -> names of invalid documents
    templates: dict[str, str] = field(default_factory=dict)
    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # host -> (file, bytes)


class _Located:
    """A model object and the document it came from."""

    __slots__ = ("doc", "obj")

    def __init__(self, obj: Any, doc: YamlDocument) -> None:
        self.obj = obj
        self.doc = doc


class Checker:
    def __init__(self, src: Sources) -> None:
        self.src = src
        self.problems: list[Problem] = []
        # hosts whose legacy_crypto allowed something ("*": the fleet-wide proposals, every host)
        self.legacy_used: set[str] = set()

    # -- reporting

    def err(self, doc: YamlDocument, path: Path, message: str, *, key: bool = False) -> None:
        self.problems.append(doc.problem(path, message, key=key))

    def warn(self, doc: YamlDocument, path: Path, message: str) -> None:
        self.problems.append(doc.problem(path, message, severity="warning"))

    def at(self, file: str, message: str, *, severity: str = "error") -> None:
        self.problems.append(Problem(file, 1, 1, "", message, severity))

    @staticmethod
    def where(doc: YamlDocument, path: Path = ()) -> str:
        line, col = doc.mark(path)
        return f"{doc.file}:{line}:{col}"

    # -- the whole run

    def run(self) -> m.Fleet | None:
        self.check_control_strings()
        hosts = self.build("Host", build.host)
        roles = self.build("Role", build.role)
        sites = self.build("Site", build.site)
        profiles = self.build("AppArmorProfile", build.apparmor)
        files = self.build("ManagedFile", build.managed_file)
        hosts_by = self.unique_names("Host", hosts)
        roles_by = self.unique_names("Role", roles)
        sites_by = self.unique_names("Site", sites)
        profiles_by = self.unique_names("AppArmorProfile", profiles)
        files_by = self.unique_names("ManagedFile", files)

        settings = self.fleet_settings()
        mesh = settings[1] if settings else None
        self.check_hosts(hosts, roles_by, mesh.internal_network if mesh else self.fallback_network())
        self.check_roles(roles, sites_by, profiles_by, files_by)
        self.check_sysctl(hosts, roles_by)
        roles_by = self.resolve_port_sources(roles, roles_by, hosts_by)
        self.check_sites(sites)
        self.check_profiles(profiles)
        self.check_files(files, hosts, roles_by, files_by)
        if settings is not None:
            self.check_management_port(settings[2], hosts)
        public_keys: dict[str, str] = {}
        if settings is not None and mesh is not None:
            peers = self.check_mesh(mesh, hosts_by)
            public_keys = self.check_keys(mesh, hosts_by, peers)
            self.check_legacy_unused(hosts)
        if settings is None or any(p.severity == "error" for p in self.problems):
            return None
        name, mesh_, firewall, drift, notifications = settings
        return m.Fleet(
            name=name,
            id=str(self.src.fleet.data.get("id", "")) if self.src.fleet is not None else "",
            mesh=mesh_,
            firewall=firewall,
            hosts=tuple(sorted((x.obj for x in hosts), key=lambda h: h.name)),
            roles=_frozen(roles_by),
            sites=_frozen(sites_by),
            apparmor=_frozen(profiles_by),
            files=_frozen(files_by),
            drift=drift,
            notifications=notifications,
            public_keys=MappingProxyType(dict(sorted(public_keys.items()))),
            templates=MappingProxyType(dict(sorted(self.src.templates.items()))),
            warnings=tuple(str(p) for p in sorted(p for p in self.problems if p.severity == "warning")),
        )

    # -- helpers

    def build(self, kind: str, fn: Any) -> list[_Located]:
        return [_Located(fn(d.data, d.file), d) for d in self.src.docs.get(kind, ())]

    def unique_names(self, kind: str, items: list[_Located]) -> dict[str, Any]:
        seen: dict[str, _Located] = {}
        for x in items:
            name = x.obj.name
            first = seen.get(name)
            if first is not None:
                self.err(
                    x.doc,
                    ("name",),
                    f"{kind} {name!r} is declared twice (also at {self.where(first.doc, ('name',))})",
                )
            else:
                seen[name] = x
        return {k: v.obj for k, v in sorted(seen.items())}

    def exists(self, kind: str, name: str, known: Mapping[str, Any]) -> bool:
        return name in known or name in self.src.broken.get(kind, set())

    def network(self, doc: YamlDocument, path: Path, text: str) -> IPv4Network:
        net = build.network(text)
        if str(net) != text:
            self.err(doc, path, f"{text!r} has host bits set (the network is {net})")
        return net

    def any_network(self, doc: YamlDocument, path: Path, text: str) -> IPv4Network | IPv6Network | None:
        """An IPv4 or IPv6 CIDR; reports an unparsable one or host bits set."""
        try:
            net = build.any_network(text)
            given = ip_address(text.split("/", 1)[0])
        except ValueError as exc:
            self.err(doc, path, f"{text!r} is not a network: {exc}")
            return None
        if net.network_address != given:
            self.err(doc, path, f"{text!r} has host bits set (the network is {net})")
        return net

    # -- checks

    def check_control_strings(self) -> None:
        for kind, doc in self.src.parsed:
            multiline = MULTILINE_FIELDS.get(kind, frozenset())
            for path, mark, char in doc.control_strings:
                if path in multiline:
                    if char == "\x00":
                        self.problems.append(
                            Problem(doc.file, *mark, format_path(path), "contains a NUL character")
                        )
                    continue
                what = _CHAR_NAMES.get(char, f"control character U+{ord(char):04X}")
                self.problems.append(
                    Problem(
                        doc.file,
                        *mark,
                        format_path(path),
                        f"contains {what}: values that reach config files must be one line",
                    )
                )

    def fleet_settings(
        self,
    ) -> tuple[str, m.Mesh, m.FirewallPolicy, m.DriftPolicy, m.Notifications] | None:
        doc = self.src.fleet
        if doc is None:
            return None
        d = doc.data
        self.network(doc, ("mesh", "internal_network"), d["mesh"]["internal_network"])
        mgmt = [
            self.any_network(doc, ("firewall", "management_sources", i), src)
            for i, src in enumerate(d["firewall"]["management_sources"])
        ]
        if mgmt and all(n is not None and n.version == 6 for n in mgmt):
            self.err(
                doc,
                ("firewall", "management_sources"),
                "needs at least one IPv4 network: reconciler reaches every host at its IPv4 "
                "public_address (IPv6 sources are added to rules.v6)",
            )
        mesh = build.mesh(d["mesh"])
        mail = (d.get("notifications") or {}).get("mail")
        if mail:
            smtp = mail.get("smtp") or {}
            if smtp.get("password_env") and not smtp.get("username_env"):
                self.err(
                    doc, ("notifications", "mail", "smtp", "password_env"), "password_env needs username_env"
                )
            if smtp.get("username_env") and not smtp.get("password_env"):
                self.err(
                    doc, ("notifications", "mail", "smtp", "username_env"), "username_env needs password_env"
                )
            if smtp.get("password_env") and smtp.get("security", "none") == "none":
                host = smtp.get("host", "127.0.0.1")
                if not _is_loopback(host):
                    self.warn(
                        doc,
                        ("notifications", "mail", "smtp", "security"),
                        "SMTP credentials would cross the network in clear: use starttls or tls",
                    )
        drift = d.get("drift") or {}
        for key in ("exclude", "secret_paths"):
            for i, pattern in enumerate(drift.get(key) or ()):
                if not any(
                    pattern == p or pattern.startswith(p.rstrip("/") + "/")
                    for p in drift.get("paths", ["/etc"])
                ):
                    self.warn(doc, ("drift", key, i), f"{pattern!r} is outside every drift path")
        return (
            d["name"],
            mesh,
            build.firewall(d["firewall"]),
            build.drift(d.get("drift")),
            build.notifications(d.get("notifications")),
        )

    def fallback_network(self) -> IPv4Network | None:
        """mesh.internal_network of a fleet.yaml that failed its schema elsewhere, if readable."""
        for kind, doc in self.src.parsed:
            if kind == "Fleet" and isinstance(doc.data, dict):
                mesh = doc.data.get("mesh")
                value = mesh.get("internal_network") if isinstance(mesh, dict) else None
                if isinstance(value, str):
                    try:
                        return IPv4Network(value, strict=False)
                    except ValueError:
                        return None
        return None

    def check_hosts(
        self, hosts: list[_Located], roles: Mapping[str, m.Role], net: IPv4Network | None
    ) -> None:
        public: dict[IPv4Address, _Located] = {}
        internal: dict[IPv4Address, _Located] = {}
        public6: dict[IPv6Address, _Located] = {}
        for x in hosts:
            h: m.Host = x.obj
            doc = x.doc
            self.check_v6_address(x, public6)
            for addr, table, fld in (
                (h.public_address, public, "public_address"),
                (h.internal_address, internal, "internal_address"),
            ):
                first = table.get(addr)
                if first is not None:
                    self.err(
                        doc,
                        (fld,),
                        f"{addr} is also the {fld.replace('_', ' ')} of {first.obj.name} "
                        f"({self.where(first.doc, (fld,))})",
                    )
                else:
                    table[addr] = x
            if net is not None:
                if h.internal_address not in net:
                    self.err(
                        doc,
                        ("internal_address",),
                        f"{h.internal_address} is not inside mesh.internal_network {net}",
                    )
                elif net.prefixlen <= 30 and h.internal_address in (
                    net.network_address,
                    net.broadcast_address,
                ):
                    self.err(
                        doc,
                        ("internal_address",),
                        f"{h.internal_address} is the network or broadcast address of {net}",
                    )
                if h.public_address in net:
                    self.err(
                        doc, ("public_address",), f"{h.public_address} is inside mesh.internal_network {net}"
                    )
            for i, r in enumerate(h.roles):
                if not self.exists("Role", r, roles):
                    self.err(doc, ("roles", i), f"unknown role {r!r}{_known(roles)}")

    def check_management_port(self, firewall: m.FirewallPolicy, hosts: list[_Located]) -> None:
        """The firewall admits management SSH only on ``firewall.management_port``, and the engine
        reaches each host (and the dead-man switch confirms a firewall change over a NEW
        connection) on the host's ``ssh.port``: they must be equal, or every firewall change cuts
        SSH and is rolled back."""
        doc = self.src.fleet
        port = firewall.management_port
        if doc is None:
            return
        field_: Path = ("firewall", "management_port")
        where = self.where(doc, field_)
        defaulted: list[str] = []
        for x in sorted(hosts, key=lambda x: x.obj.name):
            h: m.Host = x.obj
            if h.ssh.port == port:
                continue
            if "port" in (x.doc.data.get("ssh") or {}):
                self.err(
                    x.doc,
                    ("ssh", "port"),
                    f"{h.ssh.port} differs from firewall.management_port {port} ({where}): the firewall "
                    f"admits management SSH only on port {port}, so SSH to {h.name} and the dead-man "
                    "switch's confirmation (a new SSH connection) would be cut and every firewall "
                    "change rolled back; make them equal",
                )
            else:
                defaulted.append(f"{h.name} ({x.doc.file})")
        if defaulted:
            self.err(
                doc,
                field_,
                f"{port} differs from ssh.port 22 (the default: not set) of host(s) "
                f"{', '.join(defaulted)}: the firewall admits management SSH only on port {port}, so "
                "SSH to them and the dead-man switch's confirmation (a new SSH connection) would be "
                "cut and every firewall change rolled back; set ssh.port or make them equal",
            )

    def check_v6_address(self, x: _Located, seen: dict[IPv6Address, _Located]) -> None:
        text = x.doc.data.get("public_address_v6")
        if text is None:
            return
        path: Path = ("public_address_v6",)
        host: m.Host = x.obj
        v6 = host.public_address_v6
        if v6 is None:
            self.err(x.doc, path, f"{text!r} is not an IPv6 address")
            return
        bad = next(
            (
                what
                for what, flag in (
                    ("the unspecified address", v6.is_unspecified),
                    ("a loopback address", v6.is_loopback),
                    ("a link-local address", v6.is_link_local),
                    ("a multicast address", v6.is_multicast),
                    ("an IPv4-mapped address", v6.ipv4_mapped is not None),
                )
                if flag
            ),
            None,
        )
        if bad:
            self.err(x.doc, path, f"{v6} is {bad}: give the host's public IPv6 address")
            return
        first = seen.get(v6)
        if first is not None:
            self.err(
                x.doc,
                path,
                f"{v6} is also the public address v6 of {first.obj.name} ({self.where(first.doc, path)})",
            )
        else:
            seen[v6] = x

    def check_roles(
        self,
        roles: list[_Located],
        sites: Mapping[str, m.Site],
        profiles: Mapping[str, m.AppArmorProfile],
        files: Mapping[str, m.ManagedFile],
    ) -> None:
        for x in roles:
            r: m.Role = x.obj
            for fld, kind, known in (
                ("sites", "Site", sites),
                ("apparmor", "AppArmorProfile", profiles),
                ("files", "ManagedFile", files),
            ):
                for i, name in enumerate(getattr(r, fld)):
                    if not self.exists(kind, name, known):
                        self.err(x.doc, (fld, i), f"unknown {_KIND_WORDS[kind]} {name!r}{_known(known)}")
            both = set(r.packages) & set(r.purge_packages)
            for i, p in enumerate(r.purge_packages):
                if p in both:
                    self.err(x.doc, ("purge_packages", i), f"{p!r} is both installed and purged")
            for i, p in enumerate(r.replaces):
                if p in r.packages:
                    self.err(x.doc, ("replaces", i), f"{p!r} is both installed and replaced")
            names = [n for n in r.services]
            for i, n in enumerate(names):
                if n in names[:i]:
                    self.err(x.doc, ("services", i), f"service {n!r} is listed twice")
            for n, pkg in r.service_packages:
                if pkg in r.purge_packages:
                    i = names.index(n)
                    self.err(
                        x.doc, ("services", i), f"service {n!r} needs package {pkg!r}, which the role purges"
                    )

    def check_sysctl(self, hosts: list[_Located], roles_by: Mapping[str, m.Role]) -> None:
        """Two roles of one host must not set one kernel parameter to different values."""
        for x in hosts:
            h: m.Host = x.obj
            seen: dict[str, tuple[str, str]] = {}  # key -> (value, role)
            for i, name in enumerate(h.roles):
                role = roles_by.get(name)
                for key, value in role.sysctl if role is not None else ():
                    first = seen.setdefault(key, (value, name))
                    if first[0] != value:
                        self.err(
                            x.doc,
                            ("roles", i),
                            f"sysctl {key}: role {name} sets {value!r}, role {first[1]} sets {first[0]!r}",
                        )

    def resolve_port_sources(
        self, roles: list[_Located], roles_by: Mapping[str, m.Role], hosts: Mapping[str, m.Host]
    ) -> dict[str, m.Role]:
        """Each role port's ``sources``: networks checked (host bits), names resolved to hosts
        and roles (``host:NAME`` / ``role:NAME`` when a name is both). Returns the roles with
        their ports resolved."""
        out = dict(roles_by)
        for x in roles:
            r: m.Role = x.obj
            if roles_by.get(r.name) is not r:
                continue  # a duplicate, reported already
            ports = []
            for i, (port, data) in enumerate(zip(r.ports, x.doc.data.get("ports") or (), strict=False)):
                nets: list[IPv4Network | IPv6Network] = []
                src_hosts: list[str] = []
                src_roles: list[str] = []
                for j, text in enumerate(data.get("sources") or ()):
                    path: Path = ("ports", i, "sources", j)
                    if build.is_network(text):
                        net = self.any_network(x.doc, path, text)
                        if net is not None and net not in nets:
                            nets.append(net)
                        continue
                    kind, name = self.source_name(x.doc, path, text, hosts, roles_by)
                    target = src_hosts if kind == "host" else src_roles if kind == "role" else None
                    if target is not None and name not in target:
                        target.append(name)
                for name in src_roles:
                    if name in roles_by and not any(name in h.roles for h in hosts.values()):
                        self.warn(
                            x.doc,
                            ("ports", i, "sources"),
                            f"role {name!r} has no hosts: it opens port {port.port} to nobody",
                        )
                ports.append(
                    replace(
                        port,
                        sources=tuple(nets),
                        source_hosts=tuple(src_hosts),
                        source_roles=tuple(src_roles),
                    )
                )
            out[r.name] = replace(r, ports=tuple(ports))
        return out

    def source_name(
        self,
        doc: YamlDocument,
        path: Path,
        text: str,
        hosts: Mapping[str, m.Host],
        roles: Mapping[str, m.Role],
    ) -> tuple[str, str]:
        """("host" | "role" | "", name) for a port source that names a host or a role."""
        kind, _, name = text.rpartition(":")
        is_host = name in hosts or name in self.src.broken.get("Host", set())
        is_role = name in roles or name in self.src.broken.get("Role", set())
        if kind == "host":
            if not is_host:
                self.err(doc, path, f"unknown host {name!r}{_known(hosts)}")
                return "", name
            return "host", name
        if kind == "role":
            if not is_role:
                self.err(doc, path, f"unknown role {name!r}{_known(roles)}")
                return "", name
            return "role", name
        if is_host and is_role:
            self.err(doc, path, f"{name!r} is both a host and a role: write host:{name} or role:{name}")
            return "", name
        if is_host:
            return "host", name
        if is_role:
            return "role", name
        self.err(
            doc,
            path,
            f"{name!r} is neither a host nor a role nor a network (CIDR){_known(list(hosts) + list(roles))}",
        )
        return "", name

    def check_sites(self, sites: list[_Located]) -> None:
        for x in sites:
            s: m.Site = x.obj
            workers: set[str] = set()
            for i, w in enumerate(s.workers):
                if w.name in workers:
                    self.err(x.doc, ("workers", i, "name"), f"worker {w.name!r} is declared twice")
                workers.add(w.name)
            self.check_lb_workers(x, s)
            for i, h in enumerate(s.unset_headers):
                if h.lower() == "server":
                    self.err(
                        x.doc,
                        ("unset_headers", i),
                        "Apache cannot remove its own Server header (it is set after mod_headers runs): "
                        "use ServerTokens (this site gets ServerTokens Prod: 'Server: Apache')",
                    )
            for fld in ("mounts", "unmounts"):
                for i, mount in enumerate(getattr(s, fld)):
                    if mount.worker not in workers:
                        self.err(
                            x.doc, (fld, i, "worker"), f"unknown worker {mount.worker!r}{_known(workers)}"
                        )
            if s.header_location is not None:
                try:
                    re.compile(s.header_location)
                except re.error as exc:
                    self.err(x.doc, ("header_location",), f"not a valid regular expression: {exc}")
            if s.tls is not None and s.tls.port == s.port:
                self.err(x.doc, ("tls", "port"), f"tls.port {s.tls.port} is also the plain HTTP port")

    def check_lb_workers(self, x: _Located, s: m.Site) -> None:
        """lb workers balance over ajp13 workers of the same site; ajp13 ones have no members."""
        by_name = {w.name: w for w in s.workers}
        for i, w in enumerate(s.workers):
            if w.type != "lb":
                if w.members or "sticky_session" in x.doc.data["workers"][i]:
                    self.err(
                        x.doc, ("workers", i, "type"), "members and sticky_session belong to an lb worker"
                    )
                continue
            if not w.members:
                self.err(x.doc, ("workers", i), "an lb worker needs members (ajp13 workers of this site)")
            for j, name in enumerate(w.members):
                member = by_name.get(name)
                if member is None:
                    self.err(x.doc, ("workers", i, "members", j), f"unknown worker {name!r}{_known(by_name)}")
                elif member.type != "ajp13":
                    self.err(
                        x.doc, ("workers", i, "members", j), f"{name!r} is an lb worker: members are ajp13"
                    )

    def check_profiles(self, profiles: list[_Located]) -> None:
        for x in profiles:
            p: m.AppArmorProfile = x.obj
            for i, mv in enumerate(p.moved_directories):
                if mv.old == mv.new:
                    self.err(x.doc, ("moved_directories", i, "to"), "'to' is the same directory as 'from'")
            if p.content is None and not p.rules and not p.moved_directories:
                self.warn(
                    x.doc, ("name",), "profile has no content, rules or moved_directories: nothing to do"
                )

    def check_files(
        self,
        files: list[_Located],
        hosts: list[_Located],
        roles: Mapping[str, m.Role],
        files_by: Mapping[str, m.ManagedFile],
    ) -> None:
        for x in files:
            f: m.ManagedFile = x.obj
            given = [k for k in x.doc.data if k in ("content", "template", "link_target")]
            if len(given) != 1:
                self.err(
                    x.doc,
                    (given[1],) if len(given) > 1 else ("name",),
                    "give exactly one of content, template or link_target"
                    + (f" (got {', '.join(given)})" if given else ""),
                )
            if f.template is not None and f.template not in self.src.templates:
                self.err(x.doc, ("template",), f"template {f.template!r} not found in the repo")
            if f.content is not None and ("{{" in f.content or "{%" in f.content):
                self.warn(
                    x.doc,
                    ("content",),
                    "inline content holds '{{' or '{%': it is written literally (only `template:` files "
                    "are rendered by Jinja2); move it to templates/ and use template:",
                )
            if f.secret and f.content is not None:
                self.warn(x.doc, ("secret",), "secret: true but the content is in the fleet repo in clear")
            if f.link_target is not None and (f.validate or x.doc.data.get("mode") is not None):
                self.err(x.doc, ("link_target",), "a symbolic link has no mode and nothing to validate")
            if f.controlled_dir is not None:
                cd = f.controlled_dir
                if not f.path.startswith(cd.path.rstrip("/") + "/") or cd.path == "/":
                    self.err(
                        x.doc,
                        ("controlled_dir", "path"),
                        f"{cd.path} is not a directory above {f.path} (nor may it be /)",
                    )
                if f.controlled_by == "root":
                    field = ("controlled_dir", "user") if cd.user else ("controlled_dir",)
                    self.err(
                        x.doc,
                        field,
                        "name the non-root user who controls the directory (root needs no exception)",
                    )
        # two files with the same path on one host
        seen_combos: set[tuple[str, ...]] = set()
        for hx in hosts:
            h: m.Host = hx.obj
            if h.roles in seen_combos:
                continue
            seen_combos.add(h.roles)
            by_path: dict[str, str] = {}
            for rname in h.roles:
                role = roles.get(rname)
                for fname in role.files if role else ():
                    mf = files_by.get(fname)
                    if mf is None:
                        continue
                    other = by_path.setdefault(mf.path, fname)
                    if other != fname:
                        self.err(
                            hx.doc,
                            ("roles",),
                            f"files {other!r} and {fname!r} both write {mf.path} on this host",
                        )

    def check_mesh(self, mesh: m.Mesh, hosts: Mapping[str, m.Host]) -> dict[str, set[str]] | None:
        doc = self.src.fleet
        assert doc is not None
        md = doc.data["mesh"]
        # backend / mode / datapath
        if mesh.datapath is m.Datapath.LIBIPSEC and mesh.mode is not m.MeshMode.TUNNEL:
            self.err(
                doc, ("mesh", "datapath"), "datapath libipsec has no transport mode: it needs mode: tunnel"
            )
        self.check_host_stacks(mesh, hosts)
        if mesh.backend is m.IpsecBackend.RACOON:
            if mesh.mode is not m.MeshMode.IPIP:
                self.err(
                    doc,
                    ("mesh", "mode"),
                    "backend racoon builds the seed's transport-mode IP-IP mesh: it needs mode: ipip",
                )
            if mesh.datapath is not m.Datapath.KERNEL:
                self.err(doc, ("mesh", "datapath"), "backend racoon needs datapath: kernel")
            self.warn(
                doc,
                ("mesh", "backend"),
                "backend racoon speaks only IKEv1 (deprecated by RFC 8247; racoon is unmaintained)",
            )
            for k in ("ike_proposals", "esp_proposals"):
                if k in md:
                    self.warn(doc, ("mesh", k), f"{k} is ignored with backend racoon (see mesh.racoon)")
        elif "racoon" in md and not any(h.ipsec is m.IpsecBackend.RACOON for h in hosts.values()):
            self.warn(doc, ("mesh", "racoon"), "mesh.racoon is ignored: no host runs racoon")
        # links
        # peers per host; None for a full mesh (every host is every other host's peer: never
        # enumerate the n*(n-1)/2 pairs, 50 million for 10,000 hosts)
        peers: dict[str, set[str]] | None = None
        if mesh.topology is m.Topology.FULL:
            if md.get("links"):
                self.err(doc, ("mesh", "links"), "links are only used with topology: links")
        else:
            peers = {}
            seen: dict[tuple[str, str], int] = {}
            for i, pair in enumerate(md.get("links") or ()):
                a, b = pair
                bad = False
                for j, n in enumerate(pair):
                    if n not in hosts:
                        bad = True
                        if n not in self.src.broken.get("Host", set()):
                            self.err(doc, ("mesh", "links", i, j), f"unknown host {n!r}")
                if a == b:
                    self.err(doc, ("mesh", "links", i), f"a host cannot link to itself ({a})")
                    continue
                key = (a, b) if a < b else (b, a)
                if key in seen:
                    self.err(
                        doc, ("mesh", "links", i), f"link {a}-{b} is listed twice (also links[{seen[key]}])"
                    )
                    continue
                seen[key] = i
                if not bad:
                    peers.setdefault(a, set()).add(b)
                    peers.setdefault(b, set()).add(a)
            if not seen:
                self.warn(doc, ("mesh", "topology"), "topology links with no links: no host talks IPsec")
        self.check_crypto(mesh, hosts, peers)
        self.check_mixed_links(mesh, hosts, peers)
        return peers

    def host_doc(self, name: str) -> YamlDocument | None:
        return next((d for d in self.src.docs.get("Host", ()) if d.data.get("name") == name), None)

    def check_host_stacks(self, mesh: m.Mesh, hosts: Mapping[str, m.Host]) -> None:
        """A host's own ``ipsec:`` against what the fleet's mesh can do."""
        if mesh.backend is m.IpsecBackend.RACOON:
            return  # the fleet-wide checks below say it once
        for h in hosts.values():
            if h.ipsec is not m.IpsecBackend.RACOON:
                continue
            doc = self.host_doc(h.name)
            if doc is None:
                continue
            if mesh.mode is not m.MeshMode.IPIP:
                self.err(
                    doc,
                    ("ipsec",),
                    "racoon builds the seed's transport-mode IP-IP mesh: it needs mesh.mode ipip",
                )
            if mesh.datapath is not m.Datapath.KERNEL:
                self.err(doc, ("ipsec",), "racoon needs mesh.datapath kernel (libipsec is strongSwan's)")
            self.warn(
                doc, ("ipsec",), "racoon speaks only IKEv1 (deprecated by RFC 8247; racoon is unmaintained)"
            )

    def check_mixed_links(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> None:
        """A link between a racoon host and a strongSwan host is IKEv1 with racoon's proposal:
        one of the fleet's strongSwan proposals must allow it (IKE and ESP), or the link can
        never come up. Reported once per racoon host, naming both ends' files."""
        doc = self.src.fleet
        assert doc is not None

        def stack(h: m.Host) -> m.IpsecBackend:
            return h.ipsec or mesh.backend

        racoon_hosts = sorted(n for n, h in hosts.items() if stack(h) is m.IpsecBackend.RACOON)
        if not racoon_hosts or len(racoon_hosts) == len(hosts):
            return
        ike = crypto.racoon_ike_proposal(mesh.racoon)
        esp = crypto.racoon_esp_proposal(mesh.racoon)
        missing = []
        if not crypto.common_proposal(mesh.ike_proposals, ike, ike=True):
            missing.append(
                f"no IKE proposal in common: racoon offers {ike} (mesh.racoon), the strongSwan end "
                f"accepts {', '.join(mesh.ike_proposals)} (mesh.ike_proposals)"
            )
        if not crypto.common_proposal(mesh.esp_proposals, esp, ike=False):
            missing.append(
                f"no ESP proposal in common: racoon offers {esp} (mesh.racoon sa_*, pfs_group), the "
                f"strongSwan end accepts {', '.join(mesh.esp_proposals)} (mesh.esp_proposals)"
            )
        if not missing:
            return
        fix = f"add {ike} to mesh.ike_proposals and {esp} to mesh.esp_proposals, or change mesh.racoon"
        for name in racoon_hosts:
            linked = sorted(hosts) if peers is None else sorted(peers.get(name, ()))
            others = [
                p for p in linked if p != name and p in hosts and stack(hosts[p]) is m.IpsecBackend.STRONGSWAN
            ]
            if not others:
                continue
            rdoc = self.host_doc(name)
            odoc = self.host_doc(others[0])
            more = f" (and {len(others) - 1} more strongSwan peers)" if len(others) > 1 else ""
            where = f"{odoc.file}" if odoc is not None else others[0]
            msg = (
                f"link {name} (racoon) - {others[0]} (strongswan, {where}){more} is IKEv1: "
                + "; ".join(missing)
                + f": {fix}"
            )
            if rdoc is not None:
                self.err(rdoc, ("ipsec",) if "ipsec" in rdoc.data else ("name",), msg)
            else:
                self.err(doc, ("mesh",), msg)

    def check_legacy_unused(self, hosts: list[_Located]) -> None:
        """``legacy_crypto: true`` that nothing needs: a hatch left open for no reason."""
        if "*" in self.legacy_used:
            return
        for x in hosts:
            if x.obj.legacy_crypto and x.obj.name not in self.legacy_used:
                self.warn(
                    x.doc,
                    ("legacy_crypto",),
                    "legacy_crypto: true, but no proposal or key on this host's links is deprecated: "
                    "remove it (it would silently allow weak crypto added later)",
                )

    def legacy_block(self, hosts: Mapping[str, m.Host], names: Iterable[str]) -> list[str]:
        """The hosts among ``names`` that are NOT marked legacy_crypto."""
        return sorted({n for n in names if n in hosts and not hosts[n].legacy_crypto})

    def judge(self, doc: YamlDocument, path: Path, message: str, blockers: list[str]) -> None:
        if blockers:
            listed = ", ".join(blockers[:5]) + (f" and {len(blockers) - 5} more" if len(blockers) > 5 else "")
            self.err(
                doc,
                path,
                f"{message}; allowed only when every host on the link sets legacy_crypto: true "
                f"(not: {listed})",
            )
        else:
            self.legacy_used.add("*")
            self.warn(doc, path, f"{message} (allowed: every host on the link is legacy_crypto)")

    @staticmethod
    def linked_hosts(hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None) -> Iterable[str]:
        if peers is None:
            return hosts if len(hosts) >= 2 else ()
        return peers

    def check_crypto(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> None:
        doc = self.src.fleet
        assert doc is not None
        blockers = self.legacy_block(hosts, self.linked_hosts(hosts, peers))
        stacks = {h.ipsec or mesh.backend for h in hosts.values()} or {mesh.backend}
        if m.IpsecBackend.STRONGSWAN in stacks:
            for key, ike in (("ike_proposals", True), ("esp_proposals", False)):
                for i, proposal in enumerate(getattr(mesh, key)):
                    path: Path = ("mesh", key, i) if key in doc.data["mesh"] else ("mesh",)
                    for f in crypto.check_proposal(proposal, ike=ike):
                        msg = f"{proposal}: {f.message}"
                        if f.level == "invalid":
                            self.err(doc, path, msg)
                        elif f.level == "weak":
                            self.judge(doc, path, msg, blockers)
                        else:
                            self.warn(doc, path, msg)
        if m.IpsecBackend.RACOON in stacks:
            for f in crypto.check_racoon(mesh.racoon):
                path = ("mesh", "racoon", f.field)
                if f.level == "weak":
                    self.judge(doc, path, f.message, blockers)
                else:
                    self.warn(doc, path, f.message)

    def check_keys(
        self, mesh: m.Mesh, hosts: Mapping[str, m.Host], peers: dict[str, set[str]] | None
    ) -> dict[str, str]:
        everyone = self.legacy_block(hosts, hosts) if peers is None else []
        out: dict[str, str] = {}
        for host, (file, data) in sorted(self.src.keys.items()):
            if host not in hosts:
                if host not in self.src.broken.get("Host", set()):
                    self.at(file, f"public key for undeclared host {host!r}")
                continue
            try:
                key: PublicKey = parse_public_key(data)
            except KeyFileError as exc:
                self.at(file, str(exc))
                continue
            stack = hosts[host].ipsec or mesh.backend
            want = "racoon" if stack is m.IpsecBackend.RACOON else "pem"
            if key.format != want:
                need = "a racoon ': PUB 0s...' line" if want == "racoon" else "a PEM public key"
                who = (
                    f"backend {stack.value}"
                    if hosts[host].ipsec is None
                    else f"{host} (ipsec: {stack.value})"
                )
                self.at(file, f"{who} needs {need}")
                continue
            weak, warn = weaknesses(key)
            if peers is None:
                blockers = everyone if len(hosts) >= 2 else self.legacy_block(hosts, [host])
            else:
                blockers = self.legacy_block(hosts, {host, *peers.get(host, ())})
            for msg in weak:
                if blockers:
                    self.at(
                        file,
                        f"{msg}; allowed only when every host on its links sets legacy_crypto: true "
                        f"(not: {', '.join(blockers[:5])})",
                    )
                else:
                    self.legacy_used.update(
                        {host, *(peers or {}).get(host, ())} if peers is not None else {"*"}
                    )
                    self.at(file, f"{msg} (allowed: legacy_crypto)", severity="warning")
            for msg in warn:
                self.at(file, msg, severity="warning")
            out[host] = key.text
        return out


_KIND_WORDS = {
    "Site": "site",
    "AppArmorProfile": "AppArmor profile",
    "ManagedFile": "managed file",
    "Role": "role",
}


def _known(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return " (none declared)"
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f" (known: {shown})"


def _frozen(d: dict[str, T]) -> Mapping[str, T]:
    return MappingProxyType(dict(d))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return IPv4Address(host).is_loopback
    except ValueError:
        return False


def check(src: Sources) -> tuple[m.Fleet | None, list[Problem]]:
    checker = Checker(src)
    fleet = checker.run()
    return fleet, checker.problems
