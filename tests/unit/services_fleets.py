"""Test fleets for the services domains (AppArmor, Apache, managed files), built directly from
the model dataclasses. ``example_fleet()`` mirrors fleet-repo-example/ (site ``shop``, profile
``usr.sbin.mysqld`` with a moved datadir, managed file ``motd`` from templates/motd.j2), plus the
full mysqld profile the example repo should carry (see docs/SERVICES.md)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any

from reconciler.fleet.model import (
    AppArmorProfile,
    ExpiresRule,
    FirewallPolicy,
    Fleet,
    Host,
    JkMount,
    JkWorker,
    ManagedFile,
    Mesh,
    MovedDirectory,
    Role,
    Site,
    frozen_map,
)

# The seed's mysqld profile in AppArmor 3 syntax; site changes go in local/usr.sbin.mysqld.
MYSQLD_PROFILE = """\
# vim:syntax=apparmor
# AppArmor profile for mysqld (the seed's profile, in AppArmor 3 syntax).
# Site-specific additions (e.g. a moved datadir) belong in local/usr.sbin.mysqld.
abi <abi/3.0>,

include <tunables/global>

/usr/sbin/mysqld {
  include <abstractions/base>
  include <abstractions/nameservice>
  include <abstractions/user-tmp>
  include <abstractions/mysql>

  capability dac_override,
  capability setgid,
  capability setuid,

  /etc/hosts.allow r,
  /etc/hosts.deny r,

  /etc/group m,
  /etc/passwd m,

  /etc/mysql/*.pem r,
  /etc/mysql/conf.d/ r,
  /etc/mysql/conf.d/* r,
  /etc/mysql/my.cnf r,
  /usr/sbin/mysqld mr,
  /usr/share/mysql/** r,
  /var/lib/mysql/ r,
  /var/lib/mysql/** rwk,
  /var/log/mysql/ r,
  /var/log/mysql/* rw,
  @{run}/mysqld/ w,
  @{run}/mysqld/mysqld.sock w,

  # Site-specific additions and overrides.
  include if exists <local/usr.sbin.mysqld>
}
"""

MOTD_TEMPLATE = (
    "{{ host.name }} ({{ host.roles | join(', ') }}) is managed by reconciler from fleet "
    '"{{ fleet.name }}".\n'
    "Internal address: {{ host.internal_address }}. Manual changes are reverted and mailed.\n"
)

STATIC = ("/shop/*.css", "/shop/*.js", "/shop/*.html", "/shop/*.png")
COMPRESSION = ("text/html", "text/plain", "text/xml", "text/css", "text/javascript", "application/javascript")
CACHED = ("text/css", "image/png", "image/gif", "image/jpeg", "text/javascript")


def shop_site(**changes: Any) -> Site:
    site = Site(
        name="shop",
        server_name="shop.example.com",
        aliases=("www.shop.example.com",),
        document_root="/srv/shop/shop.war",
        log_level="warn",
        workers=(JkWorker(name="shop", host="127.0.0.1", port=8009),),
        mounts=(JkMount(path="/shop/*", worker="shop"),),
        unmounts=tuple(JkMount(path=p, worker="shop") for p in STATIC),
        compression=COMPRESSION,
        expires=tuple(ExpiresRule(mime_type=t, seconds=1296000) for t in CACHED),
        unset_headers=("X-Powered-By",),
        header_location="^/shop/.*",
        source_file="sites/shop.yaml",
    )
    return dataclasses.replace(site, **changes)


def mysqld_profile(**changes: Any) -> AppArmorProfile:
    profile = AppArmorProfile(
        name="usr.sbin.mysqld",
        content=MYSQLD_PROFILE,
        moved_directories=(MovedDirectory(old="/var/lib/mysql", new="/data/var/mysql"),),
        source_file="apparmor/usr.sbin.mysqld.yaml",
    )
    return dataclasses.replace(profile, **changes)


def motd_file(**changes: Any) -> ManagedFile:
    mf = ManagedFile(
        name="motd",
        path="/etc/motd",
        template="templates/motd.j2",
        mode=0o644,
        owner="root",
        group="root",
        source_file="files/motd.yaml",
    )
    return dataclasses.replace(mf, **changes)


def _host(name: str, last: int, role: str) -> Host:
    return Host(
        name=name,
        public_address=IPv4Address(f"192.0.2.{last}"),
        internal_address=IPv4Address(f"10.99.0.{last}"),
        roles=(role,),
        source_file=f"hosts/{name}.yaml",
    )


def example_fleet(
    *,
    sites: tuple[Site, ...] | None = None,
    profiles: tuple[AppArmorProfile, ...] | None = None,
    files: tuple[ManagedFile, ...] | None = None,
    templates: dict[str, str] | None = None,
    web_files: tuple[str, ...] | None = None,
) -> Fleet:
    """fleet-repo-example as dataclasses; keyword arguments replace parts of it."""
    sites = sites if sites is not None else (shop_site(),)
    profiles = profiles if profiles is not None else (mysqld_profile(),)
    files = files if files is not None else (motd_file(),)
    roles = {
        "web": Role(
            name="web",
            packages=("curl",),
            sites=tuple(s.name for s in sites),
            files=web_files if web_files is not None else tuple(f.name for f in files),
            source_file="roles/web.yaml",
        ),
        "db": Role(
            name="db",
            apparmor=tuple(p.name for p in profiles),
            files=("motd",) if any(f.name == "motd" for f in files) else (),
            source_file="roles/db.yaml",
        ),
    }
    return Fleet(
        name="example",
        mesh=Mesh(internal_network=IPv4Network("10.99.0.0/24")),
        firewall=FirewallPolicy(management_sources=(IPv4Network("192.0.2.254/32"),)),
        hosts=(
            _host("db1", 21, "db"),
            _host("db2", 22, "db"),
            _host("web1", 11, "web"),
            _host("web2", 12, "web"),
        ),
        roles=MappingProxyType(roles),
        sites=MappingProxyType({s.name: s for s in sites}),
        apparmor=MappingProxyType({p.name: p for p in profiles}),
        files=MappingProxyType({f.name: f for f in files}),
        templates=frozen_map(templates if templates is not None else {"templates/motd.j2": MOTD_TEMPLATE}),
    )
