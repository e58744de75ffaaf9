"""Children a libipsec host initiates are re-initiated when down (charon never retries a
NO_PROPOSAL_CHOSEN on its own), and only then."""

from __future__ import annotations

from dataclasses import replace

from network_fleets import example_fleet

from reconciler.domains.render import render_host
from reconciler.engine.plan import plan_host
from reconciler.fleet.model import Datapath, MeshMode
from reconciler.kinds.actions import SETTLING_KINDS, ActionKind
from reconciler.kinds.observed import IpsecState, Observed


def libipsec_desired(host: str):  # type: ignore[no-untyped-def]
    f = example_fleet()
    f = replace(f, mesh=replace(f.mesh, mode=MeshMode.TUNNEL, datapath=Datapath.LIBIPSEC))
    return render_host(f, f.host(host))


def test_only_the_pairs_initiator_lists_the_child() -> None:
    # names sort db1 < db2 < web1 < web2: db1 starts all three, web2 none
    assert libipsec_desired("db1").initiate == ("mesh-db2-net", "mesh-web1-net", "mesh-web2-net")
    assert libipsec_desired("web1").initiate == ("mesh-web2-net",)
    assert libipsec_desired("web2").initiate == ()
    f = example_fleet()  # kernel datapath: trap policies, nothing to initiate
    assert render_host(f, f.host("db1")).initiate == ()


def test_a_down_child_is_planned_once_charon_runs() -> None:
    d = libipsec_desired("web1")
    running = Observed(host="web1", ipsec=IpsecState(daemon_running=True, installed_children=()))
    acts = [a for a in plan_host(d, running).actions if a.kind is ActionKind.INITIATE_CHILD]
    assert [a.resource for a in acts] == ["ipsec child mesh-web2-net"]
    assert "initiator" in acts[0].reason and ActionKind.INITIATE_CHILD in SETTLING_KINDS
    up = Observed(host="web1", ipsec=IpsecState(daemon_running=True, installed_children=("mesh-web2-net",)))
    assert not [a for a in plan_host(d, up).actions if a.kind is ActionKind.INITIATE_CHILD]
    stopped = Observed(host="web1", ipsec=IpsecState(daemon_running=False))
    assert not [a for a in plan_host(d, stopped).actions if a.kind is ActionKind.INITIATE_CHILD]
