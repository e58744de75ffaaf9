"""Checks of the roles and what they name: port sources, sites, AppArmor profiles, managed files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from reconciler.fleet import build
from reconciler.fleet import model as m
from reconciler.fleet.semantic_context import CheckContext, Located, known
from reconciler.fleet.yamlsafe import Path, YamlDocument

_KIND_WORDS = {
    "Site": "site",
    "AppArmorProfile": "AppArmor profile",
    "ManagedFile": "managed file",
    "Role": "role",
}


class RoleChecks(CheckContext):
    def check_roles(
        self,
        roles: list[Located],
        sites: Mapping[str, m.Site],
        profiles: Mapping[str, m.AppArmorProfile],
        files: Mapping[str, m.ManagedFile],
    ) -> None:
        for x in roles:
            r: m.Role = x.obj
            for fld, kind, declared in (
                ("sites", "Site", sites),
                ("apparmor", "AppArmorProfile", profiles),
                ("files", "ManagedFile", files),
            ):
                for i, name in enumerate(getattr(r, fld)):
                    if not self.exists(kind, name, declared):
                        self.err(x.doc, (fld, i), f"unknown {_KIND_WORDS[kind]} {name!r}{known(declared)}")
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

    def resolve_port_sources(
        self, roles: list[Located], roles_by: Mapping[str, m.Role], hosts: Mapping[str, m.Host]
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
                self.err(doc, path, f"unknown host {name!r}{known(hosts)}")
                return "", name
            return "host", name
        if kind == "role":
            if not is_role:
                self.err(doc, path, f"unknown role {name!r}{known(roles)}")
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
            f"{name!r} is neither a host nor a role nor a network (CIDR){known(list(hosts) + list(roles))}",
        )
        return "", name

    def check_sites(self, sites: list[Located]) -> None:
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
                            x.doc,
                            (fld, i, "worker"),
                            f"unknown worker {mount.worker!r}{known(workers)}",
                        )
            if s.header_location is not None:
                try:
                    re.compile(s.header_location)
                except re.error as exc:
                    self.err(x.doc, ("header_location",), f"not a valid regular expression: {exc}")
            if s.tls is not None and s.tls.port == s.port:
                self.err(x.doc, ("tls", "port"), f"tls.port {s.tls.port} is also the plain HTTP port")

    def check_lb_workers(self, x: Located, s: m.Site) -> None:
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
                    self.err(x.doc, ("workers", i, "members", j), f"unknown worker {name!r}{known(by_name)}")
                elif member.type != "ajp13":
                    self.err(
                        x.doc, ("workers", i, "members", j), f"{name!r} is an lb worker: members are ajp13"
                    )

    def check_profiles(self, profiles: list[Located]) -> None:
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
        files: list[Located],
        hosts: list[Located],
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
