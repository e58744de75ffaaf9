"""The VM tier: the example fleet's four hosts as QEMU guests with a Debian 12 kernel, booted
once for the whole directory (booting is the expensive part under emulation)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.keys import collect
from reconciler.connection import ConnectionPool, targets_for
from reconciler.engine import APPLIED, IN_SYNC, FleetResult, reconcile_fleet
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.lab import Lab, specs_from_repo

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"


@pytest.fixture(scope="session")
def vm_lab(lab_factory: Any) -> Iterator[Lab]:
    """web1, web2, db1, db2 (the example's names and addresses) as QEMU guests."""
    lab = lab_factory(specs_from_repo(EXAMPLE), vm=True, lock_timeout=3600)
    yield lab
    lab.down()


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fleet-repo-example exactly as shipped (mode ipip, datapath kernel), in a scratch dir
    because `keys collect` writes keys/<host>.pub into it."""
    repo = tmp_path_factory.mktemp("vm") / "fleet"
    shutil.copytree(EXAMPLE, repo)
    return repo


def pool_for(fleet: Fleet, lab: Lab, command_timeout: float = 300) -> ConnectionPool:
    targets = targets_for(
        fleet,
        known_hosts=str(lab.info.known_hosts),
        client_keys=[str(lab.info.client_key)],
        netns=lab.info.ssh_netns,
    )
    return ConnectionPool(targets, connect_timeout=30, command_timeout=command_timeout)


async def apply(fleet: Fleet, lab: Lab, *, expect_ok: bool = True) -> FleetResult:
    async with pool_for(fleet, lab) as pool:
        result = await reconcile_fleet(fleet, None, pool, apply=True)
    if expect_ok:
        bad = [(h.host, h.status, h.error) for h in result.hosts if h.status not in (APPLIED, IN_SYNC)]
        assert not bad, bad
    return result


def converge(repo: Path, lab: Lab) -> Fleet:
    """apply (the hosts make their key pairs) -> keys collect -> reload the fleet -> apply."""
    fleet = load_fleet(repo)
    asyncio.run(apply(fleet, lab))

    async def keys() -> None:
        async with pool_for(fleet, lab) as pool:
            results = await collect(fleet, [], pool, repo)
        assert all(ok for _, _, ok in results), results

    asyncio.run(keys())
    fleet = load_fleet(repo)
    assert set(fleet.public_keys) == set(fleet.host_names())
    asyncio.run(apply(fleet, lab))
    return fleet


def sh(lab: Lab, host: str, script: str, timeout: float = 120) -> str:
    res = lab.exec(host, ["sh", "-c", script], timeout=timeout)
    assert res.returncode == 0, (host, script, res.returncode, res.stdout, res.stderr)
    return res.stdout.decode(errors="replace")
