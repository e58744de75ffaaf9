"""After a keys push, a mesh pair whose initiator applied before its responder stays down with
libipsec (no trap policies; charon does not retry a refused first attempt). The daemon's verify
after apply finds it; ``daemon.ipsec_settle`` reconciles the pair's initiator again, a bounded
number of times per commit, later each time."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from reconciler.daemon.ipsec_settle import PairSettler, initiators_of_down_pairs
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Datapath, Fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"


def fleet(datapath: Datapath) -> Fleet:
    f = load_fleet(EXAMPLE)
    return replace(f, mesh=replace(f.mesh, datapath=datapath))


def check(peer: str, name: str = "ipsec.child", status: str = "fail") -> dict[str, object]:
    cause = "no CHILD_SA without an established IKE SA"
    return {"name": name, "peer": peer, "status": status, "cause": cause}


def test_the_pairs_initiator_is_named_whichever_side_was_verified() -> None:
    f = fleet(Datapath.LIBIPSEC)
    # db1 < web1: db1 starts the pair, whether db1's or web1's verify saw it down
    assert initiators_of_down_pairs(f, "web1", [check("db1")]) == {"db1"}
    assert initiators_of_down_pairs(f, "db1", [check("web1", "ipsec.ike")]) == {"db1"}
    assert initiators_of_down_pairs(f, "web2", [check("db1"), check("web1")]) == {"db1", "web1"}


def test_only_down_pairs_only_mesh_checks_only_libipsec_only_known_hosts() -> None:
    f = fleet(Datapath.LIBIPSEC)
    assert initiators_of_down_pairs(f, "web1", [check("db1", status="pass")]) == set()
    assert initiators_of_down_pairs(f, "web1", [check("db1", name="firewall.peer")]) == set()
    assert initiators_of_down_pairs(f, "web1", [check("evil; reboot")]) == set()
    assert initiators_of_down_pairs(f, "web1", [{"name": "ipsec.child", "status": "fail"}]) == set()
    # kernel datapath: trap policies start the pair when traffic needs it
    assert initiators_of_down_pairs(fleet(Datapath.KERNEL), "web1", [check("db1")]) == set()


def test_attempts_are_bounded_per_commit_and_later_each_time() -> None:
    f = fleet(Datapath.LIBIPSEC)
    fired: list[tuple[str, float]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        settler = PairSettler(lambda h: fired.append((h, loop.time() - start)), attempts=3, delay=0.05)
        for _ in range(5):  # each verify of web1 finds the pair down again
            assert settler.on_verified(f, "c1", "web1", [check("db1")]) in (["db1"], [])
            assert settler.on_verified(f, "c1", "web1", [check("db1")]) == []  # one timer at a time
            await asyncio.sleep(0.25)
        # a new commit starts a new count
        assert settler.on_verified(f, "c2", "web1", [check("db1")]) == ["db1"]
        await asyncio.sleep(0.1)
        settler.on_verified(f, "c2", "web2", [check("db1")])
        settler.close()  # a stopping daemon: pending timers never fire
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert [h for h, _ in fired] == ["db1"] * 4  # 3 on c1, 1 on c2; the closed one never fired
    gaps = [t for _, t in fired[:3]]
    assert gaps == sorted(gaps)


def test_the_extra_reconcile_verifies_the_initiator_and_the_hosts_that_saw_the_pair_down() -> None:
    f = fleet(Datapath.LIBIPSEC)

    async def scenario() -> set[str]:
        settler = PairSettler(lambda h: None, delay=60)
        settler.on_verified(f, "c1", "web1", [check("db1")])
        settler.on_verified(f, "c1", "web2", [check("db1")])  # timer already pending: still noted
        again = settler.reverify("db1")
        assert settler.reverify("db1") == {"db1"}  # taken once
        settler.close()
        return again

    assert asyncio.run(scenario()) == {"db1", "web1", "web2"}
