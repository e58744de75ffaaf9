"""reconciler.daemon.shard: rendezvous ownership, settings, the merged fleet status."""

from __future__ import annotations

from collections import Counter

import pytest

from reconciler.daemon.config import ConfigError, ShardConfig, load_config
from reconciler.daemon.shard import Shard, merge_status, owner_of

HOSTS = [f"h{i:04d}" for i in range(1000)]


def names(n: int) -> tuple[str, ...]:
    return tuple(f"reconciler-{k}" for k in range(n))


def test_every_host_has_exactly_one_owner_and_the_load_is_even() -> None:
    shards = [Shard.from_config(ShardConfig(3, n, "http://{name}.reconciler:8080")) for n in names(3)]
    owned = [set(s.owned(HOSTS)) for s in shards]
    assert sum(len(o) for o in owned) == len(HOSTS) and set().union(*owned) == set(HOSTS)
    assert all(280 <= len(o) <= 390 for o in owned), [len(o) for o in owned]


def test_changing_n_moves_only_the_hosts_of_the_replica_that_came_or_went() -> None:
    before = {h: owner_of(h, names(3)) for h in HOSTS}
    down = {h: owner_of(h, names(2)) for h in HOSTS}
    moved = {h for h in HOSTS if before[h] != down[h]}
    assert moved == {h for h in HOSTS if before[h] == "reconciler-2"}
    up = {h: owner_of(h, names(4)) for h in HOSTS}
    assert {h for h in HOSTS if before[h] != up[h]} == {h for h in HOSTS if up[h] == "reconciler-3"}
    assert 200 <= Counter(up.values())["reconciler-3"] <= 300


def test_same_answer_on_every_replica_and_every_run() -> None:
    assert owner_of("web1", names(3)) == owner_of("web1", tuple(reversed(names(3))))
    assert [owner_of(h, names(5)) for h in HOSTS[:5]] == [owner_of(h, names(5)) for h in HOSTS[:5]]


def test_settings_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "RECONCILER_SOURCE_URL": "file:///srv/fleet.git",
        "RECONCILER_STATE_DIR": str(tmp_path),
        "RECONCILER_SHARD_REPLICAS": "3",
        "RECONCILER_SHARD_NAME": "reconciler-2",
        "RECONCILER_SHARD_PEER_URL": "http://{name}.reconciler.ops.svc:8080/",
    }
    shard = Shard.from_config(load_config(None, env).shard)
    assert shard.sharded and shard.ordinal == 2 and shard.replicas == names(3)
    assert [(p.name, p.url) for p in shard.peers] == [
        ("reconciler-0", "http://reconciler-0.reconciler.ops.svc:8080"),
        ("reconciler-1", "http://reconciler-1.reconciler.ops.svc:8080"),
    ]


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (ShardConfig(3, "reconciler", "http://{name}:8080"), "shard.name"),
        (ShardConfig(3, "reconciler-3", "http://{name}:8080"), "shard.name"),
        (ShardConfig(3, "Reconciler-0", "http://{name}:8080"), "shard.name"),
        (ShardConfig(3, "reconciler-0", ""), "shard.peer_url"),
        (ShardConfig(3, "reconciler-0", "http://fixed:8080"), "shard.peer_url"),
        (ShardConfig(3, "reconciler-0", "file:///{name}"), "shard.peer_url"),
    ],
)
def test_bad_settings_are_refused_with_the_field(cfg: ShardConfig, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Shard.from_config(cfg)


def test_one_replica_owns_everything() -> None:
    shard = Shard.from_config(ShardConfig())
    assert not shard.sharded and shard.owned(HOSTS[:3]) == tuple(HOSTS[:3])


def test_merged_status_shows_every_host_with_its_owner_and_stale_owners() -> None:
    shard = Shard.from_config(ShardConfig(3, "reconciler-0", "http://{name}:8080"))
    fleet = HOSTS[:12]

    def local(replica: str) -> dict[str, object]:
        rows = [
            {"name": h, "state": "Ready", "applied_commit": "c1"}
            for h in fleet
            if owner_of(h, names(3)) == replica
        ]
        # a peer must not speak for hosts it does not own (stale rows after a resharding)
        rows.append({"name": next(h for h in fleet if owner_of(h, names(3)) != replica), "state": "Stalled"})
        return {"hosts": rows, "source": {"good": "c1"}, "events": []}

    merged = merge_status(
        shard,
        local("reconciler-0"),
        {"reconciler-1": local("reconciler-1"), "reconciler-2": "unreachable: x"},
        fleet,
    )
    rows = {h["name"]: h for h in merged["hosts"]}
    assert list(rows) == fleet
    for h in fleet:
        owner = owner_of(h, names(3))
        assert rows[h]["owner"] == owner
        if owner == "reconciler-2":
            assert rows[h]["state"] == "Unknown" and rows[h]["owner_reachable"] is False
            assert "reconciler-2 did not answer: unreachable: x" in rows[h]["reason"]
        else:
            assert rows[h]["state"] == "Ready" and rows[h]["owner_reachable"] is True
    peers = {p["name"]: p for p in merged["shard"]["peers"]}
    assert peers["reconciler-2"]["reachable"] is False and peers["reconciler-1"]["good"] == "c1"
    assert merged["scope"] == "fleet" and sum(p["hosts"] for p in peers.values()) == 12
