"""Helpers of the VM tests: reach the guests, converge a fleet on them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from reconciler.commands.keys import collect
from reconciler.commands.plan import VM_TIME_SCALE
from reconciler.engine.fleet import APPLIED, IN_SYNC, FleetResult, reconcile_fleet
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import Fleet
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"
FIREWALL_WINDOW = 60.0


def pool_for(fleet: Fleet, lab: Lab, command_timeout: float = 300) -> ConnectionPool:
    targets = targets_for(
        fleet,
        known_hosts=str(lab.info.known_hosts),
        client_keys=[str(lab.info.client_key)],
        netns=lab.info.ssh_netns,
    )
    # emulated guests: every per-command timeout of the engine x VM_TIME_SCALE
    return ConnectionPool(
        targets, connect_timeout=30, command_timeout=command_timeout, time_scale=VM_TIME_SCALE
    )


async def apply(fleet: Fleet, lab: Lab, *, expect_ok: bool = True) -> FleetResult:
    async with pool_for(fleet, lab) as pool:
        # the firewall's dead-man window: the confirmation comes over a NEW SSH connection,
        # which costs seconds of emulated CPU per guest (10 s, the default, is tight under load)
        result = await reconcile_fleet(fleet, None, pool, apply=True, firewall_window=FIREWALL_WINDOW)
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
