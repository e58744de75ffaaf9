"""Fleet x Host -> Desired: run every domain and merge their fragments. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable

from reconciler.domains import apache, apparmor, files, firewall, ipsec, packages, sysctl, tunnels
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host
from reconciler.kinds.resources import Absent, Desired, Fragment, Handler, Package, Service

DomainRenderer = Callable[[Fleet, Host], Fragment]

# Order matters only for error messages; resources carry their own Domain for planning.
DOMAINS: tuple[tuple[str, DomainRenderer], ...] = (
    ("packages", packages.render),
    ("firewall", firewall.render),
    ("ipsec", ipsec.render),
    ("tunnels", tunnels.render),
    ("apparmor", apparmor.render),
    ("apache", apache.render),
    ("files", files.render),
    ("sysctl", sysctl.render),
)


def render_host(fleet: Fleet, host: Host) -> Desired:
    """Render one host. Raises RenderError if two domains claim one path or handler name
    with different content, or a domain refuses the fleet."""
    fragments = [(name, fn(fleet, host)) for name, fn in DOMAINS]
    return merge(host.name, fragments, warnings=fleet.warnings)


def render_all(fleet: Fleet) -> dict[str, Desired]:
    return {h.name: render_host(fleet, h) for h in fleet.hosts}


def merge(host: str, fragments: list[tuple[str, Fragment]], warnings: tuple[str, ...] = ()) -> Desired:
    paths: dict[str, str] = {}
    handlers: dict[str, Handler] = {}
    firewall_from: str | None = None
    problems: list[str] = []
    for name, frag in fragments:
        for path in [f.path for f in frag.files] + [lk.path for lk in frag.links]:
            if path in paths and paths[path] != name:
                problems.append(f"{path} is rendered by both {paths[path]} and {name}")
            elif path in paths:
                problems.append(f"{path} is rendered twice by {name}")
            paths[path] = name
        for h in frag.handlers:
            if h.name in handlers and handlers[h.name] != h:
                problems.append(f"handler {h.name} declared differently twice")
            handlers[h.name] = h
        if frag.firewall is not None:
            if firewall_from is not None:
                problems.append(f"firewall rendered by both {firewall_from} and {name}")
            firewall_from = name
    if problems:
        raise RenderError(f"host {host}: " + "; ".join(problems))

    frags = [f for _, f in fragments]
    packages: dict[str, Package] = {}
    for pkg in (x for f in frags for x in f.packages):
        packages.setdefault(pkg.name, pkg)
    services: dict[str, Service] = {}
    for svc in (x for f in frags for x in f.services):
        services.setdefault(svc.name, svc)
    return Desired(
        host=host,
        files=tuple(sorted((x for f in frags for x in f.files), key=lambda x: x.path)),
        links=tuple(sorted((x for f in frags for x in f.links), key=lambda x: x.path)),
        keypairs=tuple(sorted((x for f in frags for x in f.keypairs), key=lambda x: x.name)),
        handlers=tuple(sorted(handlers.values(), key=lambda h: h.name)),
        firewall=next((f.firewall for f in frags if f.firewall is not None), None),
        tunnels=tuple(sorted((x for f in frags for x in f.tunnels), key=lambda x: x.name)),
        packages=tuple(sorted(packages.values(), key=lambda p: p.name)),
        services=tuple(sorted(services.values(), key=lambda s: s.name)),
        pending=tuple(x for f in frags for x in f.pending),
        owned_dirs=tuple(sorted({x for f in frags for x in f.owned_dirs})),
        warnings=warnings,
        addresses=tuple(
            sorted((x for f in frags for x in f.addresses), key=lambda x: (x.interface, x.address))
        ),
        initiate=tuple(sorted({x for f in frags for x in f.initiate})),
        absent=_absent(frags, paths),
        requires=tuple(x for f in frags for x in f.requires),
        expects=tuple(x for f in frags for x in f.expects if x.path not in paths),
        sysctl=tuple(sorted((x for f in frags for x in f.sysctl), key=lambda x: x.key)),
    )


def _absent(frags: list[Fragment], rendered: dict[str, str]) -> tuple[Absent, ...]:
    """Paths that must not exist, each once; a path some domain renders is never absent."""
    out: dict[str, Absent] = {}
    for a in (x for f in frags for x in f.absent):
        if a.path not in rendered:
            out.setdefault(a.path, a)
    return tuple(out[p] for p in sorted(out))
