"""The status page's mesh picture: which state each pair gets, and the layout by site."""

from __future__ import annotations

from reconciler.daemon.statuspage import render_overview
from reconciler.daemon.statuspage.mesh import DOWN, NOT_VERIFIED, PENDING_KEYS, UP, layout, pair_state


def check(peer: str, status: str) -> dict[str, str]:
    return {"name": "ipsec.child", "peer": peer, "status": status, "cause": ""}


def test_pair_state() -> None:
    keys = {"a", "b"}
    assert pair_state("a", "c", keys, {}) == PENDING_KEYS  # c's key is not in the repo yet
    assert pair_state("a", "b", keys, {}) == NOT_VERIFIED
    assert pair_state("a", "b", keys, {"a": [check("b", "skip")]}) == NOT_VERIFIED
    assert pair_state("a", "b", keys, {"a": [check("b", "pass")]}) == UP
    assert pair_state("a", "b", keys, {"a": [check("b", "pass")], "b": [check("a", "fail")]}) == DOWN
    assert pair_state("a", "b", keys, {"a": [check("c", "fail"), check("b", "pass")]}) == UP


def test_layout_groups_by_site() -> None:
    mesh = {
        "hosts": [{"name": "w1", "site": "fra"}, {"name": "w2", "site": "fra"}, {"name": "d1", "site": "ams"},
                  {"name": "x", "site": ""}],
        "links": [{"a": "w1", "b": "d1", "state": UP}, {"a": "w2", "b": "x", "state": DOWN},
                  {"a": "w1", "b": "gone", "state": UP}],
    }  # fmt: skip
    pic = layout(mesh, {"w1": "Ready"})
    assert [g.site for g in pic.groups] == ["ams", "fleet", "fra"]
    assert {n.name: n.site for n in pic.nodes} == {"d1": "ams", "x": "fleet", "w1": "fra", "w2": "fra"}
    assert len(pic.edges) == 2 and pic.counts[UP] == 1 and pic.counts[DOWN] == 1
    w1 = next(n for n in pic.nodes if n.name == "w1")
    edge = next(e for e in pic.edges if e.a == "w1")
    assert (edge.x1, edge.y1) == (w1.x, w1.y)


def test_hostile_names_are_escaped_in_the_svg() -> None:
    evil = '"><script>alert(1)</script>'
    status = {"mesh": {"hosts": [{"name": evil, "site": evil}], "links": []}, "hosts": [], "events": []}
    page = render_overview(status)
    assert "<script>" not in page and "&lt;script&gt;" in page
