"""Fleet x Host -> Desired: run every domain and merge their fragments. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable

from reconciler.domains import apache, apparmor, files, firewall, ipsec, packages, tunnels
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host
from reconciler.resources import Desired, Fragment

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
    handlers: dict[str, object] = {}
    firewall_from: str | None = None
    problems: list[str] = []
    for name, frag in fragments:
        for p in [f.path for f in frag.files] + [lk.path for lk in frag.links]:
            if p in paths and paths[p] != name:
                problems.append(f"{p} is rendered by both {paths[p]} and {name}")
            elif p in paths:
                problems.append(f"{p} is rendered twice by {name}")
            paths[p] = name
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

    def collect(attr: str) -> list[object]:
        out: list[object] = []
        for _, frag in fragments:
            out.extend(getattr(frag, attr))
        return out

    files = sorted(collect("files"), key=lambda f: f.path)  # type: ignore[attr-defined]
    links = sorted(collect("links"), key=lambda f: f.path)  # type: ignore[attr-defined]
    packages: dict[str, object] = {}
    for p in collect("packages"):
        packages.setdefault(p.name, p)  # type: ignore[attr-defined]
    services: dict[str, object] = {}
    for s in collect("services"):
        services.setdefault(s.name, s)  # type: ignore[attr-defined]
    firewall_rules = next((f.firewall for _, f in fragments if f.firewall is not None), None)
    return Desired(
        host=host,
        files=tuple(files),  # type: ignore[arg-type]
        links=tuple(links),  # type: ignore[arg-type]
        keypairs=tuple(sorted(collect("keypairs"), key=lambda k: k.name)),  # type: ignore[attr-defined]
        handlers=tuple(sorted(handlers.values(), key=lambda h: h.name)),  # type: ignore[attr-defined]
        firewall=firewall_rules,
        tunnels=tuple(sorted(collect("tunnels"), key=lambda t: t.name)),  # type: ignore[attr-defined]
        packages=tuple(sorted(packages.values(), key=lambda p: p.name)),  # type: ignore[attr-defined]
        services=tuple(sorted(services.values(), key=lambda s: s.name)),  # type: ignore[attr-defined]
        pending=tuple(collect("pending")),  # type: ignore[arg-type]
        owned_dirs=tuple(sorted(set(collect("owned_dirs")))),  # type: ignore[arg-type]
        warnings=warnings,
    )
