"""The sysctl kind end to end on a lab host: plan shows the kernel parameters that differ,
apply writes the drop-in through the file transaction and loads it, a second plan is empty,
a value changed behind our back (``sysctl -w``) is planned again (only that key, no file
change) and put back; a key the kernel does not have fails to load and leaves the old drop-in
in place.

SAFETY: a lab host is a network namespace sharing this machine's kernel. Only ``net.*`` keys
are per namespace; the test checks, before and after, that the machine's own values did not
move."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.engine.apply import apply_host
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.host.connection import ConnectionPool, SshTarget
from reconciler.kinds import sysctl
from reconciler.kinds.actions import ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Domain, FileResource, SysctlSetting
from reconciler.lab import Lab, LabHostSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# per network namespace on this kernel (checked by test_keys_are_per_namespace)
ECHO = "net.ipv4.icmp_echo_ignore_broadcasts"
REDIRECTS = "net.ipv4.conf.all.accept_redirects"


def machine(key: str) -> str:
    """The value in the machine's own (initial) network namespace."""
    return subprocess.run(["sysctl", "-n", key], check=True, capture_output=True, text=True).stdout.strip()


def desired_for(host: str, values: dict[str, str]) -> Desired:
    assert all(k.startswith("net.") for k in values), "lab hosts share the machine's kernel: net.* only"
    settings = tuple(SysctlSetting(k, v, handler=sysctl.HANDLER) for k, v in sorted(values.items()))
    dropin = FileResource(sysctl.DROPIN, sysctl.dropin(settings), Domain.SYSCTL, handler=sysctl.HANDLER)
    return Desired(host=host, files=(dropin,), handlers=(sysctl.handler(),), sysctl=settings)


@pytest.fixture(scope="module")
def lab(lab_factory: Any) -> Iterator[Lab]:
    lab = lab_factory([LabHostSpec("k1", "192.0.2.71")], lock_timeout=3000)
    yield lab
    lab.down()


def pool_for(lab: Lab) -> ConnectionPool:
    h = lab.info.hosts[0]
    target = SshTarget(
        host=h.name,
        address=h.address,
        known_hosts=str(lab.info.known_hosts),
        client_keys=(str(lab.info.client_key),),
    )
    return ConnectionPool({h.name: target}, connect_timeout=3.0)


def live(lab: Lab, key: str) -> str:
    res = lab.exec("k1", ["sysctl", "-n", key])
    return res.stdout.decode().strip()


async def plan_of(pool: ConnectionPool, desired: Desired) -> HostPlan:
    return plan_host(desired, await observe_host(await pool.get("k1"), desired))


def test_keys_are_per_namespace() -> None:
    """The keys this test sets are the namespace's own on this kernel (else it would change the
    machine): set them in a throwaway namespace and read the machine's back."""
    before = {ECHO: machine(ECHO), REDIRECTS: machine(REDIRECTS)}
    flip = {k: "0" if v != "0" else "1" for k, v in before.items()}
    script = "sysctl -q -w " + " ".join(f"{k}={v}" for k, v in flip.items()) + f" && sysctl -n {ECHO}"
    res = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {res.stderr.strip()}")
    assert res.stdout.strip() == flip[ECHO]
    assert {ECHO: machine(ECHO), REDIRECTS: machine(REDIRECTS)} == before


async def test_sysctl_plan_apply_noop_drift_and_a_key_that_does_not_load(lab: Lab) -> None:
    before = {ECHO: machine(ECHO), REDIRECTS: machine(REDIRECTS)}
    lab.exec("k1", ["sysctl", "-q", "-w", f"{ECHO}=1", f"{REDIRECTS}=1"])
    lab.exec("k1", ["rm", "-f", sysctl.DROPIN])
    desired = desired_for("k1", {ECHO: "0", REDIRECTS: "0"})
    async with pool_for(lab) as pool:
        # plan shows both keys with their live values, the drop-in, and its load
        plan = await plan_of(pool, desired)
        kinds = [(a.kind, a.resource) for a in plan.actions]
        assert (ActionKind.SET_SYSCTL, f"sysctl {ECHO}") in kinds
        assert (ActionKind.SET_SYSCTL, f"sysctl {REDIRECTS}") in kinds
        assert (ActionKind.CREATE, f"file {sysctl.DROPIN}") in kinds
        assert (ActionKind.RELOAD, f"handler {sysctl.HANDLER}") in kinds
        echo = next(a for a in plan.actions if a.resource == f"sysctl {ECHO}")
        assert echo.reason == "'1' live, should be '0'" and f"+{ECHO} = 0" in echo.diff

        result = await apply_host(pool, "k1", plan, desired)
        assert result.ok and result.converged, result.messages
        assert live(lab, ECHO) == "0" and live(lab, REDIRECTS) == "0"
        text = lab.exec("k1", ["cat", sysctl.DROPIN]).stdout.decode()
        assert f"{ECHO} = 0\n" in text and f"{REDIRECTS} = 0\n" in text

        # a second apply has nothing to do
        again = await plan_of(pool, desired)
        assert again.actions == (), [a.as_dict() for a in again.actions]

        # someone sets a value by hand: planned again, that key only, no file change
        lab.exec("k1", ["sysctl", "-q", "-w", f"{ECHO}=1"])
        drift = await plan_of(pool, desired)
        assert [(a.kind, a.resource) for a in drift.actions] == [
            (ActionKind.SET_SYSCTL, f"sysctl {ECHO}"),
            (ActionKind.RELOAD, f"handler {sysctl.HANDLER}"),
        ]
        fixed = await apply_host(pool, "k1", drift, desired)
        assert fixed.ok and fixed.converged, fixed.messages
        assert live(lab, ECHO) == "0"

        # a key this kernel does not have: the new drop-in does not load, the old one is put back
        bad = desired_for("k1", {ECHO: "0", REDIRECTS: "0", "net.ipv4.no_such_parameter": "1"})
        plan = await plan_of(pool, bad)
        unknown = next(a for a in plan.actions if a.resource == "sysctl net.ipv4.no_such_parameter")
        assert "unknown to this kernel" in unknown.reason
        failed = await apply_host(pool, "k1", plan, bad)
        assert not failed.ok
        statuses = {o.action.resource: o.status for o in failed.outcomes}
        assert statuses[f"handler {sysctl.HANDLER}"] == "failed"
        assert statuses["sysctl net.ipv4.no_such_parameter"] == "failed"
        assert lab.exec("k1", ["cat", sysctl.DROPIN]).stdout.decode() == text
        assert (await plan_of(pool, desired)).actions == ()
    # the machine's own kernel parameters did not move
    assert {ECHO: machine(ECHO), REDIRECTS: machine(REDIRECTS)} == before
