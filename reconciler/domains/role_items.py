"""The named items (sites, AppArmor profiles, managed files) a host gets from its roles."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, Host, Role

T = TypeVar("T")


def items_of_roles(
    fleet: Fleet, host: Host, names_in: Callable[[Role], Iterable[str]], table: Mapping[str, T], what: str
) -> tuple[T, ...]:
    """Each item the host's roles name, once, sorted by name; a name the fleet does not define
    is a render error naming the host and the names (``what``: "sites", "AppArmor profiles")."""
    names: set[str] = set()
    for role in fleet.roles_of(host):
        names.update(names_in(role))
    missing = sorted(n for n in names if n not in table)
    if missing:
        raise RenderError(f"host {host.name}: roles name unknown {what}: {', '.join(missing)}")
    return tuple(table[n] for n in sorted(names))
