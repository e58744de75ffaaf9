"""Checks of fleet.yaml's settings and of the hosts: addresses, management port, sysctl."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address

from reconciler.errors import Problem
from reconciler.fleet import build
from reconciler.fleet import model as m
from reconciler.fleet.semantic_context import CheckContext, Located, known
from reconciler.fleet.yamlsafe import Path, format_path

# Fields whose value is a whole file: they may hold newlines and tabs, never NUL.
MULTILINE_FIELDS: Mapping[str, frozenset[Path]] = {
    "ManagedFile": frozenset({("content",)}),
    "AppArmorProfile": frozenset({("content",)}),
}

_CHAR_NAMES = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL character", "\t": "a tab"}


class HostChecks(CheckContext):
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

    def check_hosts(self, hosts: list[Located], roles: Mapping[str, m.Role], net: IPv4Network | None) -> None:
        public: dict[IPv4Address, Located] = {}
        internal: dict[IPv4Address, Located] = {}
        public6: dict[IPv6Address, Located] = {}
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
                    self.err(doc, ("roles", i), f"unknown role {r!r}{known(roles)}")

    def check_management_port(self, firewall: m.FirewallPolicy, hosts: list[Located]) -> None:
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

    def check_v6_address(self, x: Located, seen: dict[IPv6Address, Located]) -> None:
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

    def check_sysctl(self, hosts: list[Located], roles_by: Mapping[str, m.Role]) -> None:
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return IPv4Address(host).is_loopback
    except ValueError:
        return False
