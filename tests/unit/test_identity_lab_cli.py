"""Which fleet a lab was made for (recorded in its state), the `--lab` refusal of any other
fleet (or none), the CLI's --adopt flag and the daemon's `adopt` setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from reconciler.commands.plan import check_lab_for, register
from reconciler.daemon.config import load_config
from reconciler.engine.identity import derived_fleet_id
from reconciler.errors import ReconcilerError
from reconciler.fleet.load import load_fleet
from reconciler.lab.model import LabFleet, LabHost, LabInfo
from reconciler.lab.state import HostRecord, LabState

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"


def _info(fleet: LabFleet | None, hosts: tuple[str, ...] = ("db1", "db2", "web1", "web2")) -> LabInfo:
    return LabInfo(
        prefix="rcl1a2b",
        state_dir=Path("/run/reconciler-lab/rcl1a2b"),
        known_hosts=Path("/run/reconciler-lab/rcl1a2b/known_hosts"),
        client_key=Path("/run/reconciler-lab/rcl1a2b/client_key"),
        hosts=tuple(
            LabHost(h, f"192.0.2.{11 + i}", f"rcl1a2b-{h}", 1, Path("/x")) for i, h in enumerate(hosts)
        ),
        fleet=fleet,
    )


def test_lab_state_records_the_fleet_it_was_made_for() -> None:
    state = LabState("rcl1a2b", "rcl1a2bbr", 1, None, hosts=[HostRecord("web1", "192.0.2.11", "n", "v")])
    assert LabState.from_json(state.to_json()).fleet is None
    state.fleet = {"name": "example", "id": derived_fleet_id("example")}
    assert LabState.from_json(state.to_json()).fleet == state.fleet
    # a state file from before the record, or a mangled record: "made for no fleet"
    assert LabState.from_json(state.to_json().replace('"fleet": {', '"fleet_": {')).fleet is None


def test_lab_made_for_this_fleet_is_accepted() -> None:
    example = load_fleet(EXAMPLE)
    check_lab_for(_info(LabFleet.of(example)), example)
    assert LabFleet.of(example) == LabFleet("example", derived_fleet_id("example"))


def test_lab_made_for_another_fleet_or_none_is_refused() -> None:
    example = load_fleet(EXAMPLE)
    with pytest.raises(ReconcilerError) as err:
        check_lab_for(_info(LabFleet("shop-a", "shop-a-0001")), example)
    assert str(err.value) == (
        "--lab: lab rcl1a2b was made for fleet 'shop-a' (id shop-a-0001); this is fleet 'example' "
        f"(id {derived_fleet_id('example')}): refusing; start a lab for it: "
        "`reconciler lab down && reconciler lab up --fleet REPO`"
    )
    with pytest.raises(
        ReconcilerError, match=r"lab rcl1a2b was made for no fleet \(`reconciler lab up --hosts N`\)"
    ):
        check_lab_for(_info(None), example)
    # same name, other id: another fleet
    with pytest.raises(ReconcilerError, match="was made for fleet 'example' .id example-pinned-1"):
        check_lab_for(_info(LabFleet("example", "example-pinned-1")), example)


def test_lab_missing_a_fleet_host_is_refused_it_would_be_dialled_at_its_real_address() -> None:
    example = load_fleet(EXAMPLE)
    info = _info(LabFleet.of(example), hosts=("db1", "web1"))
    with pytest.raises(ReconcilerError, match="has no host db2, web2"):
        check_lab_for(info, example)
    check_lab_for(info, example, ["web1"])  # only the selected hosts matter


def test_plan_and_apply_take_adopt() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["apply", "repo", "--adopt", "--yes"]).adopt is True
    assert parser.parse_args(["plan", "repo"]).adopt is False
    assert parser.parse_args(["plan", "repo", "--adopt"]).adopt is True


def test_daemon_adopt_setting(tmp_path: Path) -> None:
    assert load_config(None, {}).adopt == ()
    assert load_config(None, {"RECONCILER_ADOPT": "web1, db2"}).adopt == ("web1", "db2")
    path = tmp_path / "reconciler.yaml"
    path.write_text("adopt: [web1]\n")
    assert load_config(path, {}).adopt == ("web1",)
