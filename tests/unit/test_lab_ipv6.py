"""Lab host IPv6 addresses: derived from the IPv4 one unless the fleet gives one, always inside
the documentation prefix 2001:db8::/64 (never routed), unique; the lab state file keeps its
format (a lab made by this version stays readable by another one on the same machine)."""

from __future__ import annotations

import json
from ipaddress import IPv6Address

import pytest
from network_fleets import example_fleet

from reconciler.lab.fleet import specs_from_fleet
from reconciler.lab.lab import _validate_specs
from reconciler.lab.model import LabError, LabHostSpec, default_v6
from reconciler.lab.state import HostRecord, LabState


def test_the_default_ipv6_address_mirrors_the_ipv4_one() -> None:
    assert default_v6("192.0.2.11") == "2001:db8::11"
    assert LabHostSpec("web1", "192.0.2.21").address_v6 == "2001:db8::21"
    assert LabHostSpec("h", "192.0.2.12", "2001:DB8:0::0012").address_v6 == "2001:db8::12"


@pytest.mark.parametrize("bad", ["2001:db8:1::5", "fe80::1", "2001:db8::", "not-an-address"])
def test_an_ipv6_address_outside_the_lab_prefix_is_refused(bad: str) -> None:
    with pytest.raises(LabError, match="lab host h"):
        LabHostSpec("h", "192.0.2.12", bad)


def test_duplicate_ipv6_addresses_are_refused() -> None:
    specs = [LabHostSpec("a", "192.0.2.11"), LabHostSpec("b", "192.0.2.12", "2001:db8::11")]
    with pytest.raises(LabError, match="duplicate IPv6 address 2001:db8::11"):
        _validate_specs(specs)


def test_specs_from_a_fleet_carry_its_ipv6_addresses() -> None:
    specs = {s.name: s.address_v6 for s in specs_from_fleet(example_fleet())}
    assert specs == {
        "db1": "2001:db8::21",
        "db2": "2001:db8::22",
        "web1": "2001:db8::11",
        "web2": "2001:db8::12",
    }
    assert all(IPv6Address(a) for a in specs.values())


def test_the_state_file_has_no_new_host_fields() -> None:
    state = LabState("rclx", "rclxbr", 1, None, hosts=[HostRecord("a", "192.0.2.11", "rclx-a", "rclxh0")])
    host = json.loads(state.to_json())["hosts"][0]
    assert set(host) == {"name", "address", "netns", "veth", "pid", "pid_start", "init_pid"}
