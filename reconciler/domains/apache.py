"""Domain `apache`: Apache sites in front of Tomcat/JBoss with mod_jk (Fleet x Host -> Fragment).

Pure. The seed's six steps, for every site of the host's roles, in Debian's layout:

- ``sites-available/<site>.conf`` (+ its ``sites-enabled`` link): the vhost with ServerName,
  ServerAlias, ServerAdmin, DocumentRoot, a minimal ``<Directory>``, per-site logs, the mod_jk
  mounts (``JkMount``/``JkUnMount``/``JkOptions +ForwardURICompat``), compression, browser
  caching and header removal; a second vhost with ``SSLEngine on`` when TLS is declared
  (certificate paths only: keys stay on the host).
- ``mods-enabled`` links (``.load`` and, where Debian ships one, ``.conf``) for every module
  the sites need, with the modules those depend on (``# Depends:`` of Debian's .load files),
  so ``apache2ctl -t`` passes on a host where they were never enabled.
- ``mods-available/jk.conf``: replaces Debian's example so ``JkWorkersFile`` is defined exactly
  once, with the seed's JkShmFile/JkLogFile/JkLogLevel/JkLogStampFormat;
  ``workers.properties`` (``worker.list``, per worker type/host/port). ``JkWorkersFile`` is
  relative to ServerRoot, so validating a staged tree checks the staged workers file.
- ``conf-available/zz-reconciler.conf`` (+ link): ``ServerTokens Prod`` and ``ServerSignature
  Off``. Debian's ``conf-enabled/security.conf`` sets ``ServerTokens OS``/``ServerSignature On``;
  conf-enabled is read in name order and the last one wins, so ours sorts last. ``Listen`` for
  site ports that ports.conf does not open.

Every resource belongs to the handler ``apache2``: the whole staged /etc/apache2 is checked with
``apache2ctl -t`` (``APACHE_CONFDIR={tree}``) before the swap, then ``apache2ctl graceful`` if
Apache runs. The packages themselves (apache2, libapache2-mod-jk) and the apache2 service come
from the ``packages`` domain; resources here name them in ``needs_package``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.domains.packages import APACHE_STATUS
from reconciler.domains.role_items import items_of_roles
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host, JkWorker, Site
from reconciler.kinds.resources import (
    Absent,
    Domain,
    FileResource,
    Fragment,
    Handler,
    LinkResource,
    Validator,
)

APACHE_DIR = "/etc/apache2"
HANDLER = "apache2"
SERVICE = "apache2"  # the declared service (domains.packages.apache_service)
PACKAGE = "apache2"
JK_PACKAGE = "libapache2-mod-jk"
WORKERS_FILE = "workers.properties"  # relative to ServerRoot (/etc/apache2)
HARDENING_CONF = "zz-reconciler.conf"  # sorts after Debian's security.conf

JK_LOG_FILE = "/var/log/apache2/mod_jk.log"
JK_SHM_FILE = "/var/log/apache2/mod_jk.shm"
JK_LOG_LEVEL = "info"
JK_LOG_STAMP_FORMAT = "[%a %b %d %H:%M:%S %Y] "


@dataclass(frozen=True)
class ApacheModule:
    """A module as Debian's packages ship it in /etc/apache2/mods-available."""

    name: str
    has_conf: bool  # mods-available/<name>.conf exists and a2enmod links it too
    depends: tuple[str, ...] = ()  # "# Depends:" of <name>.load
    package: str = PACKAGE


# Checked against the machine's mods-available by tests/unit/test_render_services_apache.py.
MODULES: dict[str, ApacheModule] = {
    m.name: m
    for m in (
        ApacheModule("authz_core", has_conf=False),
        ApacheModule("deflate", has_conf=True, depends=("filter",)),
        ApacheModule("expires", has_conf=False),
        ApacheModule("filter", has_conf=False),
        ApacheModule("headers", has_conf=False),
        ApacheModule("jk", has_conf=True, package=JK_PACKAGE),
        ApacheModule("mime", has_conf=True),
        ApacheModule("rewrite", has_conf=False),
        ApacheModule("setenvif", has_conf=True),
        ApacheModule("socache_shmcb", has_conf=False),
        ApacheModule("ssl", has_conf=True, depends=("setenvif", "mime", "socache_shmcb")),
    )
}

# The modules every site needs; ssl only when TLS is declared; the others when a site uses
# them. (The seed enabled rewrite everywhere; no site directive needs it, so it is no longer
# enabled, and a link an earlier apply made is pruned as having left the fleet.)
BASE_MODULES = ("authz_core",)
# Debian defaults a host's sites replace (their own compression policy; their own vhosts):
# Debian's global deflate.conf compresses text/html, text/plain, ... for every vhost whatever
# the sites declare, and its default site answers for any unknown Host.
REPLACED_DEFAULTS = (
    (
        f"{APACHE_DIR}/mods-enabled/deflate.conf",
        "Debian's global compression list: each site declares its own",
    ),
    (
        f"{APACHE_DIR}/sites-enabled/000-default.conf",
        "Debian's default site: the fleet's sites own this host",
    ),
)
# modules whose Debian .conf is not enabled with them (REPLACED_DEFAULTS)
NO_CONF = frozenset({"deflate"})


def sites_of(fleet: Fleet, host: Host) -> tuple[Site, ...]:
    """The sites of the host's roles, each once, sorted by name."""
    return items_of_roles(fleet, host, lambda role: role.sites, fleet.sites, "sites")


# ---------------------------------------------------------------- values that reach the config


def _where(site: Site) -> str:
    return site.source_file or f"site {site.name}"


def _word(site: Site, value: str, field: str) -> str:
    """A value written bare into a directive: no whitespace, quotes or control characters."""
    if not value or any(c.isspace() or c in "\"'\\<>\0" or ord(c) < 32 for c in value):
        raise RenderError(f"{_where(site)}: {field}: {value!r} cannot be written into an Apache directive")
    return value


def _quoted(site: Site, value: str, field: str) -> str:
    """A value written as one double-quoted Apache argument (regexes)."""
    if any(c in "\n\r\0" for c in value):
        raise RenderError(f"{_where(site)}: {field}: holds a newline or NUL")
    return '"' + value.replace('"', '\\"') + '"'


# ---------------------------------------------------------------- modules


def modules_for(site: Site) -> tuple[str, ...]:
    """The modules a site needs, without their dependencies."""
    needed = set(BASE_MODULES)
    if site.workers or site.mounts or site.unmounts:
        needed.add("jk")
    if site.unset_headers:
        needed.add("headers")
    if site.expires:
        needed.add("expires")
    if site.compression:
        needed.add("deflate")
    if site.tls is not None:
        needed.add("ssl")
    return tuple(sorted(needed))


def with_dependencies(names: set[str] | tuple[str, ...]) -> tuple[str, ...]:
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        todo.extend(MODULES[name].depends)
    return tuple(sorted(out))


def _module_links(names: tuple[str, ...]) -> list[LinkResource]:
    links: list[LinkResource] = []
    for name in names:
        mod = MODULES[name]
        exts = ("load", "conf") if mod.has_conf and name not in NO_CONF else ("load",)
        for ext in exts:
            links.append(
                LinkResource(
                    path=f"{APACHE_DIR}/mods-enabled/{name}.{ext}",
                    target=f"../mods-available/{name}.{ext}",  # what a2enmod writes
                    domain=Domain.APACHE,
                    handler=HANDLER,
                    needs_package=mod.package,
                )
            )
    return links


# ---------------------------------------------------------------- mod_jk


def workers_of(sites: tuple[Site, ...]) -> tuple[JkWorker, ...]:
    """Every worker of the host's sites, each once (same name = same worker), sorted."""
    workers: dict[str, tuple[JkWorker, Site]] = {}
    for site in sites:
        declared = {w.name for w in site.workers}
        for mount in site.mounts + site.unmounts:
            if mount.worker not in declared and mount.worker != "*":
                raise RenderError(
                    f"{_where(site)}: mount {mount.path} uses worker {mount.worker!r}, "
                    f"which the site does not declare (declared: {', '.join(sorted(declared)) or 'none'})"
                )
        for w in site.workers:
            for member in w.members:
                if member not in declared:
                    raise RenderError(f"{_where(site)}: lb worker {w.name}: unknown member {member!r}")
            _word(site, w.name, "workers.name")
            _word(site, w.host, f"workers[{w.name}].host")
            _word(site, w.type, f"workers[{w.name}].type")
            seen = workers.get(w.name)
            if seen is not None and seen[0] != w:
                raise RenderError(
                    f"{_where(site)}: worker {w.name} is declared differently by {_where(seen[1])}"
                )
            workers[w.name] = (w, site)
    return tuple(w for w, _ in sorted(workers.values(), key=lambda ws: ws[0].name))


def render_workers(workers: tuple[JkWorker, ...]) -> str:
    """``worker.list`` names what JkMount may use: every lb worker and every ajp13 worker that
    is no lb member (members are reached through their balancer only)."""
    members = {m for w in workers if w.type == "lb" for m in w.members}
    listed = [w.name for w in workers if w.name not in members]
    lines = [
        "# Managed by reconciler: mod_jk workers of this host's sites; local changes are reverted.",
        f"worker.list={','.join(listed)}",
    ]
    for w in workers:
        if w.type == "lb":
            lines += [
                "",
                f"worker.{w.name}.type=lb",
                f"worker.{w.name}.balance_workers={','.join(w.members)}",
                f"worker.{w.name}.sticky_session={'true' if w.sticky_session else 'false'}",
            ]
            continue
        lines += [
            "",
            f"worker.{w.name}.type={w.type}",
            f"worker.{w.name}.host={w.host}",
            f"worker.{w.name}.port={w.port}",
        ]
        if w.name in members:
            # the route is the member's name: Tomcat's jvmRoute must match it for sticky sessions
            lines += [f"worker.{w.name}.lbfactor={w.lbfactor}", f"worker.{w.name}.route={w.name}"]
    return "\n".join(lines) + "\n"


def render_jk_conf() -> str:
    return "\n".join(
        [
            "# Managed by reconciler: mod_jk global settings (replaces Debian's example jk.conf,",
            "# so that JkWorkersFile is defined exactly once). Local changes are reverted.",
            "<IfModule jk_module>",
            f"    # relative to ServerRoot: {APACHE_DIR}/{WORKERS_FILE}",
            f"    JkWorkersFile {WORKERS_FILE}",
            f"    JkShmFile     {JK_SHM_FILE}",
            f"    JkLogFile     {JK_LOG_FILE}",
            f"    JkLogLevel    {JK_LOG_LEVEL}",
            f'    JkLogStampFormat "{JK_LOG_STAMP_FORMAT}"',
            "</IfModule>",
            "",
        ]
    )


# ---------------------------------------------------------------- global hardening


def _default_listen_ports(ssl_enabled: bool) -> set[int]:
    # Debian's ports.conf: Listen 80, and Listen 443 inside <IfModule ssl_module>
    return {80, 443} if ssl_enabled else {80}


def render_hardening(extra_ports: tuple[int, ...]) -> str:
    lines = [
        "# Managed by reconciler: global settings of the sites of this host. Local changes are reverted.",
        "# Named to sort after Debian's security.conf (ServerTokens OS, ServerSignature On):",
        "# for these server-wide directives the last one read wins.",
        "ServerTokens Prod",
        "ServerSignature Off",
    ]
    if extra_ports:
        lines.append("# site ports that ports.conf does not open")
        lines.extend(f"Listen {p}" for p in extra_ports)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the vhost


def _vhost_body(site: Site) -> list[str]:
    root = _word(site, site.document_root, "document_root")
    name = _word(site, site.name, "name")
    out = [
        f"ServerName {_word(site, site.server_name, 'server_name')}",
    ]
    if site.aliases:
        out.append("ServerAlias " + " ".join(_word(site, a, "aliases") for a in site.aliases))
    out += [
        f"ServerAdmin {_word(site, site.server_admin, 'server_admin')}",
        f"DocumentRoot {root}",
        f"<Directory {root}>",
        "    Options FollowSymLinks",
        "    AllowOverride None",
        "    Require all granted",
        "</Directory>",
        "",
        f"ErrorLog ${{APACHE_LOG_DIR}}/{name}-error.log",
        f"LogLevel {_word(site, site.log_level, 'log_level')}",
        f"CustomLog ${{APACHE_LOG_DIR}}/{name}-access.log combined",
    ]
    if site.mounts or site.unmounts:
        out += ["", "# mod_jk: the application server answers these paths ..."]
        out += [f"JkMount {_word(site, m.path, 'mounts.path')} {m.worker}" for m in site.mounts]
        out.append("JkOptions +ForwardURICompat")
        if site.unmounts:
            out.append("# ... except the static files, which Apache serves itself")
            out += [f"JkUnMount {_word(site, m.path, 'unmounts.path')} {m.worker}" for m in site.unmounts]
    if site.compression:
        out += [
            "",
            "# compression",
            "AddOutputFilterByType DEFLATE "
            + " ".join(_word(site, t, "compression") for t in site.compression),
        ]
    if site.expires:
        out += ["", "# browser caching", "ExpiresActive On"]
        out += [
            f"ExpiresByType {_word(site, e.mime_type, 'expires.type')} A{int(e.seconds)}"
            for e in site.expires
        ]
    if site.unset_headers:
        unset = [f"Header unset {_word(site, h, 'unset_headers')}" for h in site.unset_headers]
        out += ["", "# do not expose what serves the pages"]
        if site.header_location is not None:
            out.append(f"<LocationMatch {_quoted(site, site.header_location, 'header_location')}>")
            out += ["    " + line for line in unset]
            out.append("</LocationMatch>")
        else:
            out += unset
    return out


def render_site(site: Site) -> str:
    body = _vhost_body(site)
    lines = [
        f"# Managed by reconciler from {_where(site)}: local changes are reverted.",
        f"<VirtualHost *:{int(site.port)}>",
        *(("    " + line) if line else "" for line in body),
        "</VirtualHost>",
    ]
    if site.tls is not None:
        tls = site.tls
        lines += [
            "",
            "# TLS: the certificate and key files are on the host; the key never leaves it.",
            f"<VirtualHost *:{int(tls.port)}>",
            *(("    " + line) if line else "" for line in body),
            "",
            "    SSLEngine on",
            f"    SSLCertificateFile {_word(site, tls.certificate_file, 'tls.certificate_file')}",
            f"    SSLCertificateKeyFile {_word(site, tls.key_file, 'tls.key_file')}",
        ]
        if tls.chain_file is not None:
            lines.append(f"    SSLCertificateChainFile {_word(site, tls.chain_file, 'tls.chain_file')}")
        lines.append("</VirtualHost>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- handler and fragment


def handler() -> Handler:
    return Handler(
        name=HANDLER,
        validators=(
            Validator(
                argv=("apache2ctl", "-t"),
                tree_root=APACHE_DIR,
                # Debian's apache2ctl passes "-d $APACHE_CONFDIR" and reads its envvars, so
                # every relative Include (and JkWorkersFile) resolves inside the staged tree.
                env=(("APACHE_CONFDIR", "{tree}"),),
                needs_command="apache2ctl",
            ),
        ),
        reload=("apache2ctl", "graceful"),
        # graceful on a stopped Apache would start it unproven: a stopped Apache is started
        # through its declared service instead, and proven (reconciler.engine.apply)
        only_if_running=APACHE_STATUS,
        service=SERVICE,
    )


def _file(path: str, text: str, package: str = PACKAGE) -> FileResource:
    return FileResource(
        path=path, content=text.encode("utf-8"), domain=Domain.APACHE, handler=HANDLER, needs_package=package
    )


def _link(path: str, target: str, package: str = PACKAGE) -> LinkResource:
    return LinkResource(
        path=path, target=target, domain=Domain.APACHE, handler=HANDLER, needs_package=package
    )


def render(fleet: Fleet, host: Host) -> Fragment:
    sites = sites_of(fleet, host)
    if not sites:
        return Fragment()
    files: list[FileResource] = []
    links: list[LinkResource] = []
    needed: set[str] = set()
    for site in sites:
        needed.update(modules_for(site))
        name = _word(site, site.name, "name")
        files.append(_file(f"{APACHE_DIR}/sites-available/{name}.conf", render_site(site)))
        links.append(_link(f"{APACHE_DIR}/sites-enabled/{name}.conf", f"../sites-available/{name}.conf"))
    modules = with_dependencies(tuple(needed))
    links += _module_links(modules)

    workers = workers_of(sites)
    if "jk" in modules:
        if not workers:
            raise RenderError(f"host {host.name}: sites use mod_jk mounts but declare no workers")
        files.append(_file(f"{APACHE_DIR}/mods-available/jk.conf", render_jk_conf(), JK_PACKAGE))
        files.append(_file(f"{APACHE_DIR}/{WORKERS_FILE}", render_workers(workers), JK_PACKAGE))

    ports = {s.port for s in sites} | {s.tls.port for s in sites if s.tls is not None}
    extra = tuple(sorted(ports - _default_listen_ports("ssl" in modules)))
    files.append(_file(f"{APACHE_DIR}/conf-available/{HARDENING_CONF}", render_hardening(extra)))
    links.append(_link(f"{APACHE_DIR}/conf-enabled/{HARDENING_CONF}", f"../conf-available/{HARDENING_CONF}"))

    return Fragment(
        files=tuple(sorted(files, key=lambda f: f.path)),
        links=tuple(sorted(links, key=lambda lk: lk.path)),
        handlers=(handler(),),
        absent=tuple(Absent(path, Domain.APACHE, why, HANDLER) for path, why in REPLACED_DEFAULTS),
    )
