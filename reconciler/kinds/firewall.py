"""Kind ``firewall``: the diff of the desired iptables/ip6tables rulesets against the live ones
(canonical text, per table), or of their persistent files. Applied under a dead-man switch by
``reconciler.engine.deadman``. Observed (only with a firewall) by ``iptables-save`` and, when the
firewall manages IPv6, ``ip6tables-save`` (``NO_IPV6`` on a kernel without IPv6); the persistent
files are stated with the declared files (``reconciler.kinds.files``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType

from reconciler.host.script import ScriptBuilder
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.files import plan_file
from reconciler.kinds.kind import BaseKind, PlanStep, SectionReader
from reconciler.kinds.observed import IptablesState, Observed
from reconciler.kinds.resources import Desired, FileResource, FirewallRuleset
from reconciler.netfilter.iptables import IptablesParseError, canonical_iptables

NO_IPV6 = "reconciler-no-ipv6"  # the ip6tables section's answer on a kernel without IPv6


def iptables_text(state: IptablesState, tables: Iterable[str] | None = None) -> str:
    """Canonical text of a ruleset (the tables given, or all), as compared by the plan."""
    out: list[str] = []
    names = sorted(state.tables) if tables is None else list(tables)
    for name in names:
        if name not in state.tables:
            continue
        policies, rules = state.tables[name]
        out.append(f"*{name}")
        out.extend(f":{chain} {policy}" for chain, policy in policies)
        out.extend(rules)
        out.append("COMMIT")
    return "\n".join(out) + ("\n" if out else "")


def plan_firewall(
    fw: FirewallRuleset,
    observed: Observed,
    *,
    declared: frozenset[str] = frozenset(),
    warnings: list[str] | None = None,
) -> list[Action]:
    """One ``restore-firewall`` action when the live IPv4 or IPv6 ruleset differs (both are
    loaded together under one dead-man switch); otherwise the persistent files, unless they are
    declared files of their own (``declared``)."""
    if fw.rules_v6 is not None and observed.kernel.get("ipv6") is False:
        if warnings is not None:
            warnings.append(
                "firewall: the kernel has no IPv6 (no /proc/net/if_inet6): rules.v6 is not loaded"
            )
        fw = replace(fw, rules_v6=None)
    diffs: list[str] = []
    reasons: list[str] = []
    for label, want_rules, live in (
        ("iptables", fw.rules_v4, observed.iptables),
        ("ip6tables", fw.rules_v6, observed.ip6tables),
    ):
        if want_rules is None:
            continue
        want = canonical_iptables(want_rules)
        tables = sorted(want.tables)
        live_text = "" if live is None else iptables_text(live, tables)
        want_text = iptables_text(want, tables)
        if live_text == want_text:
            continue
        family = "IPv6" if label == "ip6tables" else "IPv4"
        reasons.append(
            f"the live {family} ruleset could not be read"
            if live is None
            else f"the live {family} netfilter ruleset differs"
        )
        diffs.append(
            "".join(
                difflib.unified_diff(
                    live_text.splitlines(keepends=True),
                    want_text.splitlines(keepends=True),
                    fromfile=f"{label} (live)",
                    tofile=f"{label} (desired)",
                )
            )
        )
    if diffs:
        return [
            Action(
                ActionKind.RESTORE_FIREWALL,
                "firewall",
                fw.domain,
                "; ".join(reasons) + "; applied under a dead-man rollback",
                diff="".join(diffs),
                path=fw.persistent_path,
                target=fw,
            )
        ]  # the persistent files are written after the live rules are confirmed
    out: list[Action] = []
    persistent = [(fw.persistent_path, fw.rules_v4)]
    if fw.rules_v6 is not None:
        persistent.append((fw.persistent_path_v6, fw.rules_v6))
    for path, text in persistent:
        state = observed.files.get(path)
        if state is not None and path not in declared:
            file_res = FileResource(path=path, content=text.encode(), domain=fw.domain, mode=0o640)
            out += plan_file(file_res, state)
    return out


class FirewallKind(BaseKind):
    name = "firewall"

    def wanted(self, desired: Desired) -> bool:
        return desired.firewall is not None

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        b.add("frame iptables iptables-save")
        if desired.firewall is not None and desired.firewall.rules_v6 is not None:
            # a kernel without IPv6 (ipv6.disable=1) has no /proc/net/if_inet6
            b.add(
                "if [ -e /proc/net/if_inet6 ]; then frame ip6tables ip6tables-save; "
                f"else frame ip6tables echo {NO_IPV6}; fi"
            )

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        iptables: IptablesState | None = None
        ipt = read("iptables", "iptables-save")
        if ipt is not None:
            try:
                iptables = canonical_iptables(ipt)
            except IptablesParseError as err:
                read.error(f"iptables-save: unparsable output: {err}")
        if desired.firewall is None or desired.firewall.rules_v6 is None:
            return replace(observed, iptables=iptables)
        ip6tables: IptablesState | None = None
        ip6t = read("ip6tables", "ip6tables-save")
        kernel = dict(observed.kernel)
        if ip6t is not None and ip6t.strip() == NO_IPV6:
            kernel["ipv6"] = False
        elif ip6t is not None:
            kernel["ipv6"] = True
            try:
                ip6tables = canonical_iptables(ip6t)
            except IptablesParseError as err:
                read.error(f"ip6tables-save: unparsable output: {err}")
        return replace(observed, iptables=iptables, ip6tables=ip6tables, kernel=MappingProxyType(kernel))

    def plan(self, step: PlanStep) -> Sequence[Action]:
        if step.desired.firewall is None:
            return ()
        declared = frozenset(f.path for f in step.desired.files)
        return plan_firewall(step.desired.firewall, step.observed, declared=declared, warnings=step.warnings)


KIND = FirewallKind()
