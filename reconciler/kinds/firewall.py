"""Kind ``firewall``: the diff of the desired iptables/ip6tables rulesets against the live ones
(canonical text, per table), or of their persistent files. Applied under a dead-man switch by
``reconciler.engine.deadman``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import replace

from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.files import plan_file
from reconciler.kinds.observed import IptablesState, Observed
from reconciler.kinds.resources import FileResource, FirewallRuleset
from reconciler.netfilter.iptables import canonical_iptables


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
