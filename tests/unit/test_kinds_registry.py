"""The registry of kinds: one observation script assembled from every kind's probe, each kind
handed its sections, each kind's diff called in registry order (reconciler.kinds.registry)."""

from __future__ import annotations

import re
from pathlib import Path

from reconciler.domains.render import render_all
from reconciler.engine.observe import PRELUDE, build_script, parse_observation
from reconciler.engine.plan import plan_host
from reconciler.fleet.load import load_fleet
from reconciler.kinds.registry import FILES, KINDS, PACKAGES
from reconciler.kinds.resources import (
    Desired,
    Domain,
    FileResource,
    FirewallRuleset,
    Handler,
    Package,
    Service,
    Tunnel,
)

REPO = Path(__file__).resolve().parents[2]
# commands a probe line may run directly (everything else is a prelude function)
COMMANDS = {"iptables-save", "ip6tables-save", "ip", "printf", "echo", "sysctl"}


def everything() -> Desired:
    return Desired(
        host="h1",
        files=(FileResource("/etc/a", b"x", Domain.FILES),),
        firewall=FirewallRuleset("*filter\nCOMMIT\n", rules_v6="*filter\nCOMMIT\n"),
        tunnels=(Tunnel("t1", "192.0.2.1", "192.0.2.2", "10.99.0.1", "10.99.0.2", "h2"),),
        handlers=(Handler("charon"),),
        initiate=("h1-h2",),
        packages=(Package("apache2"),),
        services=(Service("apache2"), Service("racoon", running=False, pid_file="/run/racoon.pid")),
    )


def test_registry_order_and_names() -> None:
    names = [k.name for k in KINDS]
    assert len(set(names)) == len(names)
    assert KINDS[0] is FILES and PACKAGES in KINDS
    assert FILES.wanted(Desired(host="h")), "the file records (and the host's own) are always read"
    assert [k.name for k in KINDS if k.wanted(Desired(host="h"))] == ["files"]


def test_every_shell_function_is_defined_once_and_every_probe_calls_a_defined_one() -> None:
    defined = re.findall(r"^([a-z_0-9]+)\(\) \{", PRELUDE, flags=re.M)
    assert len(defined) == len(set(defined)), sorted(d for d in defined if defined.count(d) > 1)
    desireds = [everything()]
    for fleet in ("fleet-repo-example", "fleet-repo-datacentres"):
        desireds += render_all(load_fleet(REPO / fleet)).values()
    for d in desireds:
        script, args = build_script(d)
        body = script[len(PRELUDE) :]
        called = re.findall(r"frame [a-z0-9.]+ ([a-z_0-9-]+)", body)
        assert called, d.host
        unknown = {c for c in called if c not in defined and c not in COMMANDS}
        assert not unknown, (d.host, unknown)


def test_each_kind_reports_its_own_failures_in_registry_order() -> None:
    """No section came back at all: every wanted kind says what it could not read, in kind
    order, and the plan carries those errors (engine.fleet applies nothing on such a host)."""
    d = everything()
    observed = parse_observation("h1", d, {})
    errors = list(observed.errors)
    firsts = ["files:", "iptables-save:", "ip addr:", "ip xfrm policy:", "dpkg-query:", "service apache2:"]
    positions = [next(i for i, e in enumerate(errors) if e.startswith(f)) for f in firsts]
    assert positions == sorted(positions), errors
    plan = plan_host(d, observed)
    assert set(errors) <= set(plan.errors)
    assert not any(a.kind.value == "install-package" for a in plan.actions), "dpkg was not read"
