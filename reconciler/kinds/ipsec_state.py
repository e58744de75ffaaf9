"""strongSwan's view of a host, parsed in ONE place: ``swanctl --list-conns --pretty`` and
``--list-sas --pretty`` (the vici message tree, one key per line, so values with spaces such as
``class = public key`` parse exactly). Observe reads the names (loaded connections, IKE SAs
up, CHILD_SAs installed); verify reads the whole tree. Pure: works on recorded output.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

VNode = dict[str, "VValue"]
VValue = str | list[str] | VNode

# ---------------------------------------------------------------- vici --pretty


class ViciParseError(ValueError):
    pass


def parse_vici_pretty(text: str) -> list[tuple[str, VNode]]:
    """``swanctl --pretty`` output -> [(event name, tree)] (e.g. ("list-sa event", {...}))."""
    events: list[tuple[str, VNode]] = []
    stack: list[VNode] = []
    current_list: list[str] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if current_list is not None:
            if line == "]":
                current_list = None
            else:
                current_list.append(line)
            continue
        if line.endswith(" {") or line == "{":
            name = line[:-1].strip()
            node: VNode = {}
            if not stack:
                events.append((name, node))
            else:
                stack[-1][name] = node
            stack.append(node)
            continue
        if line == "}":
            if not stack:
                raise ViciParseError(f"line {n}: unbalanced '}}'")
            stack.pop()
            continue
        if not stack:
            continue  # noise outside any message (e.g. a plugin warning)
        if line.endswith(" = ["):
            items: list[str] = []
            stack[-1][line[:-4].strip()] = items
            current_list = items
            continue
        key, sep, value = line.partition(" = ")
        if not sep:
            if line.endswith(" ="):
                stack[-1][line[:-2].strip()] = ""
                continue
            raise ViciParseError(f"line {n}: not 'key = value': {line!r}")
        stack[-1][key.strip()] = value
    if stack:
        raise ViciParseError("unterminated section (output cut off?)")
    return events


def _s(node: Mapping[str, VValue], key: str) -> str:
    v = node.get(key, "")
    return v if isinstance(v, str) else ""


def _l(node: Mapping[str, VValue], key: str) -> tuple[str, ...]:
    v = node.get(key, [])
    return tuple(v) if isinstance(v, list) else ()


def _n(node: Mapping[str, VValue], key: str) -> VNode:
    v = node.get(key, {})
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True)
class ChildConf:
    name: str
    mode: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]


@dataclass(frozen=True)
class ConnConf:
    name: str
    local_addrs: tuple[str, ...]
    remote_addrs: tuple[str, ...]
    local_id: str
    remote_id: str
    children: tuple[ChildConf, ...]

    def child(self, name: str) -> ChildConf | None:
        return next((c for c in self.children if c.name == name), None)


@functools.lru_cache(maxsize=512)
def parse_conns(text: str) -> dict[str, ConnConf]:
    """Connections of ``swanctl --list-conns --pretty`` (cached on the text: every pair of a
    host reads the same output; callers must not mutate the result)."""
    out: dict[str, ConnConf] = {}
    for event, tree in parse_vici_pretty(text):
        if event != "list-conn event":
            continue
        for name, node in tree.items():
            if not isinstance(node, dict):
                continue
            local = next((v for k, v in node.items() if k.startswith("local") and isinstance(v, dict)), {})
            remote = next((v for k, v in node.items() if k.startswith("remote") and isinstance(v, dict)), {})
            children = tuple(
                ChildConf(cname, _s(c, "mode"), _l(c, "local-ts"), _l(c, "remote-ts"))
                for cname, c in _n(node, "children").items()
                if isinstance(c, dict)
            )
            out[name] = ConnConf(
                name,
                _l(node, "local_addrs"),
                _l(node, "remote_addrs"),
                _s(local, "id"),
                _s(remote, "id"),
                children,
            )
    return out


@dataclass(frozen=True)
class ChildSa:
    name: str
    state: str
    mode: str
    protocol: str
    encap: bool
    spi_in: str
    spi_out: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    packets_in: int
    packets_out: int


@dataclass(frozen=True)
class IkeSa:
    name: str
    uniqueid: str
    state: str
    local_host: str
    remote_host: str
    remote_id: str
    initiator_spi: str
    responder_spi: str
    children: tuple[ChildSa, ...]


def _int(v: str) -> int:
    return int(v) if v.isdigit() else 0


@functools.lru_cache(maxsize=512)
def parse_sas(text: str) -> tuple[IkeSa, ...]:
    """IKE SAs of ``swanctl --list-sas --pretty`` (cached on the text)."""
    out: list[IkeSa] = []
    for event, tree in parse_vici_pretty(text):
        if event != "list-sa event":
            continue
        for name, node in tree.items():
            if not isinstance(node, dict):
                continue
            children = tuple(
                ChildSa(
                    _s(c, "name") or cname,
                    _s(c, "state"),
                    _s(c, "mode"),
                    _s(c, "protocol"),
                    _s(c, "encap") == "yes",
                    _s(c, "spi-in"),
                    _s(c, "spi-out"),
                    _l(c, "local-ts"),
                    _l(c, "remote-ts"),
                    _int(_s(c, "packets-in")),
                    _int(_s(c, "packets-out")),
                )
                for cname, c in _n(node, "child-sas").items()
                if isinstance(c, dict)
            )
            out.append(
                IkeSa(
                    name,
                    _s(node, "uniqueid"),
                    _s(node, "state"),
                    _s(node, "local-host"),
                    _s(node, "remote-host"),
                    _s(node, "remote-id"),
                    _s(node, "initiator-spi"),
                    _s(node, "responder-spi"),
                    children,
                )
            )
    return tuple(out)


def loaded_conns(text: str) -> tuple[str, ...]:
    """Names of the connections ``swanctl --list-conns --pretty`` lists."""
    return tuple(parse_conns(text))


def up_names(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IKE_SA names ESTABLISHED, CHILD_SA names INSTALLED) from ``swanctl --list-sas --pretty``."""
    sas = parse_sas(text)
    ike = [sa.name for sa in sas if sa.state == "ESTABLISHED"]
    children = [c.name for sa in sas for c in sa.children if c.state == "INSTALLED"]
    return tuple(dict.fromkeys(ike)), tuple(dict.fromkeys(children))
