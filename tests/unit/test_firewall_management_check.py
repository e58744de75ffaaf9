"""The management-SSH lockout check at render time (domains/firewall.py ``check_management``):
every address of every management source network must be admitted, so both ENDS of each
network are probed (a rule admitting only part of the network is a lockout for the rest)."""

from __future__ import annotations

import pytest
from network_fleets import example_fleet

from reconciler.domains import firewall
from reconciler.errors import RenderError

# example_fleet's management_sources: 192.0.2.254/32 and 198.51.100.0/24
WHOLE = "-A INPUT -s 198.51.100.0/24 -p tcp -m tcp --dport 22 -j ACCEPT"


def _ruleset(replacement: str) -> tuple[str, object, object]:
    fleet = example_fleet()
    host = fleet.host("db1")
    text = firewall.ruleset(fleet, host)
    assert WHOLE in text
    return text.replace(WHOLE, replacement), fleet, host


def test_the_rendered_ruleset_passes() -> None:
    text, fleet, host = _ruleset(WHOLE)
    firewall.check_management(fleet, host, text, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("admitted", "locked_out"),
    [
        ("198.51.100.0/25", "198.51.100.255"),  # the lower half only: the broadcast end is locked out
        ("198.51.100.128/25", "198.51.100.0"),  # the upper half only: the network end is locked out
    ],
)
def test_a_rule_admitting_part_of_a_source_network_is_a_lockout(admitted: str, locked_out: str) -> None:
    text, fleet, host = _ruleset(WHOLE.replace("198.51.100.0/24", admitted))
    with pytest.raises(RenderError) as err:
        firewall.check_management(fleet, host, text, None)  # type: ignore[arg-type]
    assert f"from {locked_out} (198.51.100.0/24)" in str(err.value), err.value
    assert "would not admit management SSH" in str(err.value)
