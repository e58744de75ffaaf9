"""The context every cross-document check shares: the documents and the problem list.

``Sources`` is what the loader hands over; ``CheckContext`` collects problems (never stops at
the first) and holds the helpers the checks of semantic_*.py use: a model object with its
document (``Located``), unique names, references, networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from reconciler.errors import Problem
from reconciler.fleet import build
from reconciler.fleet.yamlsafe import Path, YamlDocument


@dataclass
class Sources:
    """What the loader hands over: schema-valid documents by kind, and the rest of the repo."""

    fleet: YamlDocument | None = None
    docs: dict[str, list[YamlDocument]] = field(default_factory=dict)  # kind -> valid documents
    parsed: list[tuple[str, YamlDocument]] = field(default_factory=list)  # every parsed document
    broken: dict[str, set[str]] = field(default_factory=dict)  # kind -> names of invalid documents
    templates: dict[str, str] = field(default_factory=dict)
    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # host -> (file, bytes)


class Located:
    """A model object and the document it came from."""

    __slots__ = ("doc", "obj")

    def __init__(self, obj: Any, doc: YamlDocument) -> None:
        self.obj = obj
        self.doc = doc


class CheckContext:
    """Problems found so far and the helpers every check uses."""

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

    # -- helpers

    def build(self, kind: str, fn: Callable[[Any, str], Any]) -> list[Located]:
        return [Located(fn(d.data, d.file), d) for d in self.src.docs.get(kind, ())]

    def unique_names(self, kind: str, items: list[Located]) -> dict[str, Any]:
        seen: dict[str, Located] = {}
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


def known(names: Iterable[str]) -> str:
    """ " (known: a, b, ...)" for a message about an unknown name."""
    names = sorted(names)
    if not names:
        return " (none declared)"
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f" (known: {shown})"
