"""Checks across documents, then the Fleet.

Runs on schema-valid documents and collects every problem (never stops at the first): unique
names and addresses, references, links, address plans, paths, crypto policy (with the
``legacy_crypto`` escape hatch), keys, one-line values. Warnings are ``Problem``s with
``severity="warning"``; they end up in ``Fleet.warnings`` when the fleet is valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

from reconciler.errors import Problem
from reconciler.fleet import build
from reconciler.fleet import model as m
from reconciler.fleet.semantic_context import Sources
from reconciler.fleet.semantic_hosts import MULTILINE_FIELDS, HostChecks
from reconciler.fleet.semantic_mesh import MeshChecks
from reconciler.fleet.semantic_roles import RoleChecks

__all__ = ["MULTILINE_FIELDS", "Checker", "Sources", "check"]

T = TypeVar("T")


class Checker(HostChecks, RoleChecks, MeshChecks):
    """Every check, run in order: the hosts', the roles' (what they name), the mesh's."""

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


def _frozen(d: dict[str, T]) -> Mapping[str, T]:
    return MappingProxyType(dict(d))


def check(src: Sources) -> tuple[m.Fleet | None, list[Problem]]:
    checker = Checker(src)
    fleet = checker.run()
    return fleet, checker.problems
