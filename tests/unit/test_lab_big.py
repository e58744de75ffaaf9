"""Big labs: addresses from 198.18.0.0/15, several bridges past a bridge's port limit, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.lab import limits, network
from reconciler.lab.model import LabError, LabHostSpec, big_address, default_v6


def test_big_addresses_are_unique_and_in_the_benchmarking_block() -> None:
    addrs = [big_address(i) for i in range(4000)]
    assert addrs[0] == "198.18.0.11" and addrs[244] == "198.18.0.255" and addrs[245] == "198.18.1.0"
    assert len(set(addrs)) == 4000
    v6 = {default_v6(a) for a in addrs} | {default_v6(f"192.0.2.{n}") for n in range(1, 254)}
    assert len(v6) == 4000 + 253
    assert default_v6("198.18.0.11") == "2001:db8::1:0:b"
    for a in addrs[:3] + addrs[-3:]:
        LabHostSpec("h", a)


@pytest.mark.parametrize(
    "address", ["198.19.255.254", "198.18.0.0", "198.19.255.255", "198.20.0.1", "10.0.0.1"]
)
def test_bridge_network_and_foreign_addresses_are_refused(address: str) -> None:
    with pytest.raises(LabError, match="198.18.0.0/15"):
        LabHostSpec("h", address)


def test_example_fleet_addresses_still_work() -> None:
    assert LabHostSpec("web1", "192.0.2.11").address_v6 == "2001:db8::11"


def test_many_bridges_joined_in_a_star() -> None:
    hosts = [(f"h{i}", i, big_address(i)) for i in range(7)]
    first, second = network.create_lines("rclt", hosts, ports_per_bridge=3)
    assert [line for line in first if "type bridge" in line] == [
        "link add rclt type bridge".replace("rclt ", "rcltbr "),
        "link add rcltb1 type bridge",
        "link add rcltb2 type bridge",
    ]
    assert "addr add 198.19.255.254/15 dev rcltbr noprefixroute" in first
    assert "addr add 192.0.2.254/24 dev rcltbr noprefixroute" in first
    assert "link add rcltx1 type veth peer name rclty1" in first
    assert "link set rcltx2 master rcltbr up" in second and "link set rclty2 master rcltb2 up" in second
    masters = [line.split()[4] for line in second if line.startswith("link set rclth")]
    assert masters == ["rcltbr"] * 3 + ["rcltb1"] * 3 + ["rcltb2"]
    assert "route replace 198.18.0.11/32 dev rcltbr src 198.19.255.254" in second
    # every name fits IFNAMSIZ and is recognised as the lab's for removal
    for name in ("rclt9zz9br", "rclabcdeb3", "rclabcdex3", "rclabcdey3", "rclabcdeh3999"):
        assert len(name) <= 15 and network._is_lab_link(name)
    assert network.bridges_needed(1000) == 1 and network.bridges_needed(1001) == 2


def test_limits_raised_only_for_big_labs_and_put_back(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "net/ipv6/neigh/default").mkdir(parents=True)
    (tmp_path / "kernel/pid_max").write_text("32768\n")
    (tmp_path / "net/ipv6/neigh/default/gc_thresh3").write_text("1024\n")
    assert limits.raise_for(50, tmp_path) == {}
    changed = limits.raise_for(1000, tmp_path)
    assert changed == {"kernel/pid_max": [32768, 64768], "net/ipv6/neigh/default/gc_thresh3": [1024, 5024]}
    limits.restore(changed, tmp_path)
    assert (tmp_path / "kernel/pid_max").read_text() == "32768\n"
