"""Kind ``tunnel`` (IP-IP interfaces) and ``address`` (an address on an interface): the diff
against the observed links and the change scripts. Observed by ``ip -d -j addr show`` (kind
``links``, with tunnels or addresses) and the kernel's module facts (kind ``kernel``, with
tunnels: ``/sys/module``, ``modinfo``, ``/dev/net/tun``). A kernel without ipip is a skip with
the reason, never a failure."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from reconciler.host.script import (
    Framed,
    ScriptBuilder,
    prelude,
    result_text,
    run_framed,
    said,
    token,
)
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.kind import ApplyRun, BaseKind, PlanStep, SectionReader, planned
from reconciler.kinds.observed import LinkState, Observed
from reconciler.kinds.resources import Address, Desired, Pending, Tunnel


def tunnel_addresses(t: Tunnel) -> tuple[str, ...]:
    local = t.address if "/" in t.address else f"{t.address}/32"
    peer = t.peer_address if "/" in t.peer_address else f"{t.peer_address}/32"
    return (f"{local} peer {peer}",)


def plan_tunnels(tunnels: tuple[Tunnel, ...], observed: Observed) -> tuple[list[Action], list[Pending]]:
    out: list[Action] = []
    skipped: list[Pending] = []
    if not tunnels:
        return out, skipped
    if observed.kernel.get("ipip") is False:
        for t in tunnels:
            skipped.append(
                Pending(
                    t.domain,
                    f"tunnel {t.name}",
                    "skipped: this kernel has no ipip module (ip link add type ipip: Unknown device type); "
                    "load or build the 'ipip' kernel module",
                )
            )
        return out, skipped
    links: Mapping[str, LinkState] = {lk.name: lk for lk in observed.links}
    for t in tunnels:
        live = links.get(t.name)
        res = f"tunnel {t.name}"
        if live is None:
            out.append(
                Action(
                    ActionKind.CREATE_TUNNEL,
                    res,
                    t.domain,
                    f"missing (ipip {t.local} -> {t.remote}, {t.address} peer {t.peer_address}, to {t.peer})",
                    target=t,
                )
            )
            continue
        problems = []
        if live.kind != "ipip":
            problems.append(f"is of kind {live.kind}")
        if live.local != t.local or live.remote != t.remote:
            problems.append(f"endpoints {live.local} -> {live.remote}, want {t.local} -> {t.remote}")
        if tuple(sorted(live.addresses)) != tunnel_addresses(t):
            problems.append(f"addresses {', '.join(live.addresses) or 'none'}, want {tunnel_addresses(t)[0]}")
        if not live.up:
            problems.append("is down")
        if problems:
            out.append(Action(ActionKind.RECREATE_TUNNEL, res, t.domain, "; ".join(problems), target=t))
    return out, skipped


def plan_addresses(addresses: tuple[Address, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    links = {lk.name: lk for lk in observed.links}
    for a in addresses:
        live = links.get(a.interface)
        have = {x.split()[0] for x in live.addresses} if live is not None else set()
        if a.address not in have:
            where = a.interface if live is not None else f"{a.interface} (interface not observed)"
            out.append(
                Action(
                    ActionKind.ADD_ADDRESS,
                    f"address {a.address} on {a.interface}",
                    a.domain,
                    f"missing on {where}",
                    target=a,
                )
            )
    return out


TUNNEL_SCRIPT = (
    prelude()
    + r"""
# $1 name $2 local $3 remote $4 address $5 peer $6 recreate(0|1); says OK, NOIPIP or FAIL (why)
n=$1
if [ "$6" = 1 ]; then ip link del "$n" 2>/dev/null; fi
if ! out=$(ip link add "$n" type ipip local "$2" remote "$3" 2>&1); then
  case "$out" in
    *"Unknown device type"*|*"No such device"*) say NOIPIP "$out"; exit 0;;
  esac
  say FAIL "ip link add: $out"; exit 0
fi
out=$(ip addr add "$4" peer "$5" dev "$n" 2>&1) || { say FAIL "ip addr add: $out"; exit 0; }
out=$(ip link set "$n" up 2>&1) || { say FAIL "ip link set up: $out"; exit 0; }
say OK
"""
)


def tunnel_outcome(framed: Framed) -> tuple[str, str]:
    """What the tunnel script said last: (OK | NOIPIP | FAIL | "", why)."""
    tag, _, why = (said(framed.sections) or [""])[-1].partition(" ")
    return tag, why.strip()


async def apply_tunnels(run: ApplyRun) -> None:
    todo = planned(run, {ActionKind.CREATE_TUNNEL, ActionKind.RECREATE_TUNNEL}, Tunnel)
    if not todo:
        return
    conn = await run.conn()
    for i, a, t in todo:
        local_addr, _, peer = tunnel_addresses(t)[0].partition(" peer ")
        recreate = "1" if a.kind is ActionKind.RECREATE_TUNNEL else "0"
        framed = await run_framed(
            conn, TUNNEL_SCRIPT, (t.name, t.local, t.remote, local_addr, peer, recreate), timeout=30
        )
        tag, why = tunnel_outcome(framed)
        if tag == "OK":
            run.mark(i, "done")
        elif tag == "NOIPIP":
            msg = f"tunnel {t.name} skipped: the kernel has no ipip module (ip link add type ipip: {why})"
            run.mark(i, "n/a", msg)
            run.messages.append(msg)
        else:
            why = why or result_text(framed.result)
            run.mark(i, "failed", why)
            run.messages.append(f"tunnel {t.name}: {why}")


async def apply_addresses(run: ApplyRun) -> None:
    todo = planned(run, {ActionKind.ADD_ADDRESS}, Address)
    if not todo:
        return
    conn = await run.conn()
    for i, _, a in todo:
        res = await conn.run(["ip", "addr", "replace", a.address, "dev", a.interface], timeout=30)
        if res.exit_status == 0:
            run.mark(i, "done")
        else:
            run.mark(i, "failed", result_text(res))
            run.messages.append(f"address {a.address} on {a.interface}: {result_text(res)}")


# ---------------------------------------------------------------- observation

KERNEL_MODULES = ("ipip", "esp4", "ah4", "xfrm_user", "vxlan", "tun")

KERNEL_SHELL = r"""kernel_facts() {
  for m in $KMODS; do
    if [ -d "/sys/module/$m" ]; then echo "$m loaded"
    elif modinfo -n "$m" >/dev/null 2>&1; then echo "$m module"
    else echo "$m absent"; fi
  done
  if [ -c /dev/net/tun ]; then echo "devtun present"; else echo "devtun absent"; fi
}
"""


def parse_links(data: str) -> tuple[LinkState, ...]:
    """``ip -d -j addr show``: every interface with kind, tunnel endpoints, IPv4 addresses."""
    items: list[Any] = json.loads(data) if data.strip() else []
    out: list[LinkState] = []
    for item in items:
        if not isinstance(item, dict) or "ifname" not in item:
            continue
        info = item.get("linkinfo") or {}
        kind = str(info.get("info_kind") or item.get("link_type") or "unknown")
        idata = info.get("info_data") or {}
        addrs = []
        for a in item.get("addr_info") or []:
            if a.get("family") != "inet" or "local" not in a:
                continue
            plen = a.get("prefixlen", 32)
            if a.get("address") and a.get("address") != a["local"]:
                addrs.append(f"{a['local']}/32 peer {a['address']}/{plen}")
            else:
                addrs.append(f"{a['local']}/{plen}")
        local = idata.get("local")
        remote = idata.get("remote")
        out.append(
            LinkState(
                name=str(item["ifname"]),
                kind=kind,
                local=str(local) if local and local != "any" else None,
                remote=str(remote) if remote and remote != "any" else None,
                addresses=tuple(sorted(addrs)),
                up="UP" in (item.get("flags") or []),
            )
        )
    return tuple(out)


def parse_kernel(text: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1] in ("loaded", "module", "present")
    # the names the plan asks for
    facts = {"ipip": out.get("ipip", False), "esp": out.get("esp4", False), "ah": out.get("ah4", False)}
    facts.update({"xfrm": out.get("xfrm_user", False), "vxlan": out.get("vxlan", False)})
    facts["tun"] = out.get("tun", False) or out.get("devtun", False)
    return facts


class LinksKind(BaseKind):
    name = "links"

    def wanted(self, desired: Desired) -> bool:
        return bool(desired.tunnels or desired.addresses)

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        b.add("frame addr ip -d -j addr show")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        addr = read("addr", "ip addr")
        if addr is None:
            return observed
        try:
            return replace(observed, links=parse_links(addr))
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            read.error(f"ip addr: unparsable JSON: {err}")
            return observed

    def plan(self, step: PlanStep) -> Sequence[Action]:
        actions, skipped = plan_tunnels(step.desired.tunnels, step.observed)
        step.skipped.extend(skipped)
        return [*actions, *plan_addresses(step.desired.addresses, step.observed)]


class KernelKind(BaseKind):
    """Facts the tunnels' plan reads (module loaded or loadable, ``/dev/net/tun``)."""

    name = "kernel"
    shell = KERNEL_SHELL

    def wanted(self, desired: Desired) -> bool:
        return bool(desired.tunnels)

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        b.add(f"KMODS='{' '.join(token(m) for m in KERNEL_MODULES)}'")
        b.add("frame kernel kernel_facts")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        facts = parse_kernel(read("kernel", "kernel facts", required=False) or "")
        return replace(observed, kernel=MappingProxyType({**facts, **observed.kernel}))


LINKS = LinksKind()
KERNEL = KernelKind()
