"""Failures are typed: every engine failure path keeps a Reason that decides terminal or
transient, from where it happened (connection, render, observation, apply) to the daemon's
engine step. Nothing is guessed back from a message."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from reconciler.daemon import engine_step
from reconciler.daemon.step import Target
from reconciler.engine import fleet as engine
from reconciler.engine.apply import ApplyResult, _failure
from reconciler.engine.run import ActionOutcome, HostRun
from reconciler.errors import (
    Failure,
    FleetInvalid,
    HostKeyRefused,
    IdentityMismatch,
    Problem,
    Reason,
    ReconcilerError,
    RenderError,
    Terminal,
    Transient,
    pick_failure,
)
from reconciler.fleet.load import load_fleet
from reconciler.host.connection import AuthRefused, CommandTimeout, ConnectFailed, ConnectionLost
from reconciler.host.script import prelude
from reconciler.kinds import apache as apache_kind
from reconciler.kinds.actions import Action, ActionKind, HostPlan
from reconciler.kinds.resources import Desired, Domain, Package, Service

EXAMPLE = Path(__file__).resolve().parents[2] / "fleet-repo-example"

TERMINAL = {
    Reason.FLEET_INVALID,
    Reason.RENDER_REFUSED,
    Reason.HOST_KEY_REFUSED,
    Reason.AUTH_REFUSED,
    Reason.IDENTITY_MISMATCH,
    Reason.VALIDATION_FAILED,
    Reason.FIREWALL_ROLLED_BACK,
    Reason.RELOAD_BROKE_SERVICE,
    Reason.REFUSED,
}


def test_every_reason_has_one_class() -> None:
    assert {r for r in Reason if r.terminal} == TERMINAL
    assert Reason.UNREACHABLE.terminal is False and Reason.DPKG_LOCKED.terminal is False


@pytest.mark.parametrize(
    ("exc", "reason", "terminal"),
    [
        (FleetInvalid([Problem("fleet.yaml", 1, 1, "name", "bad")]), Reason.FLEET_INVALID, True),
        (RenderError("would lock out SSH"), Reason.RENDER_REFUSED, True),
        (HostKeyRefused("changed key"), Reason.HOST_KEY_REFUSED, True),
        (AuthRefused("permission denied"), Reason.AUTH_REFUSED, True),
        (IdentityMismatch("not web1"), Reason.IDENTITY_MISMATCH, True),
        (Terminal("refused"), Reason.REFUSED, True),
        (ConnectFailed("no route"), Reason.UNREACHABLE, False),
        (CommandTimeout("took too long"), Reason.TIMEOUT, False),
        (ConnectionLost("reset"), Reason.CONNECTION_LOST, False),
        (Transient("flaky"), Reason.APPLY_FAILED, False),
        (ReconcilerError("unknown host"), Reason.FAILED, False),
        (TimeoutError(), Reason.TIMEOUT, False),
        (KeyError("bug"), Reason.INTERNAL_ERROR, False),
    ],
)
def test_exceptions_carry_their_reason(exc: BaseException, reason: Reason, terminal: bool) -> None:
    f = Failure.of(exc)
    assert f.reason is reason and f.terminal is terminal
    err = f.error()
    assert isinstance(err, Terminal if terminal else Transient) and err.reason is reason


def test_a_class_cannot_carry_the_other_classes_reason() -> None:
    with pytest.raises(ValueError):
        Terminal("x", reason=Reason.UNREACHABLE)
    with pytest.raises(ValueError):
        Transient("x", reason=Reason.FIREWALL_ROLLED_BACK)
    assert Terminal("x", reason=Reason.VALIDATION_FAILED).reason is Reason.VALIDATION_FAILED
    assert Transient("x", reason=Reason.DPKG_LOCKED).reason is Reason.DPKG_LOCKED


def test_the_first_terminal_failure_decides() -> None:
    lock = Failure(Reason.DPKG_LOCKED, "dpkg lock held by pid 42")
    broke = Failure(Reason.RELOAD_BROKE_SERVICE, "apache2 died")
    assert pick_failure([lock, broke]) is broke
    assert pick_failure([lock]) is lock
    assert pick_failure([]) is None


# ---------------------------------------------------------------- apply: _failure


def _run(actions: list[Action], *, services: tuple[Service, ...] = ()) -> HostRun:
    plan = HostPlan("web1", tuple(actions))
    return HostRun(None, "web1", plan, Desired(host="web1", services=services), "tok")  # type: ignore[arg-type]


def _outcomes(run: HostRun, statuses: list[str]) -> tuple[ActionOutcome, ...]:
    for i, st in enumerate(statuses):
        run.mark(i, st, f"{st} here")
    return tuple(run.outcomes[i] for i in range(len(statuses)))


FILE = Action(ActionKind.UPDATE, "file /etc/motd", Domain.FILES, "differs", path="/etc/motd")
FW = Action(ActionKind.RESTORE_FIREWALL, "firewall", Domain.FIREWALL, "differs")
PKG = Action(ActionKind.INSTALL_PACKAGE, "package curl", Domain.PACKAGES, "absent", target=Package("curl"))
SVC = Action(ActionKind.START_SERVICE, "service x", Domain.SERVICES, "not running", target=Service("x"))


def test_apply_failure_firewall_rolled_back_is_terminal() -> None:
    run = _run([FW, FILE])
    run.rolled_back = True
    run.messages.append("firewall change rolled back: management SSH was cut")
    f = _failure(run, _outcomes(run, ["failed", "skipped"]), converged=False)
    assert f.reason is Reason.FIREWALL_ROLLED_BACK and f.terminal and "management SSH was cut" in f.message


def test_apply_failure_recorded_by_a_phase_wins_over_a_transient_one() -> None:
    run = _run([PKG, FILE])
    run.transient.append("dpkg lock held by pid 7 (apt-get)")
    run.fail(Reason.VALIDATION_FAILED, "validation failed: apache2ctl -t")
    f = _failure(run, _outcomes(run, ["failed", "failed"]), converged=False)
    assert f.reason is Reason.VALIDATION_FAILED and f.terminal


@pytest.mark.parametrize(
    ("actions", "statuses", "transient", "reason"),
    [
        ([PKG, FILE], ["failed", "done"], [], Reason.PACKAGE_FAILED),
        ([PKG], ["failed"], ["dpkg lock held by pid 7"], Reason.DPKG_LOCKED),
        ([SVC], ["failed"], [], Reason.SERVICE_FAILED),
        ([FILE], ["done"], [], Reason.NOT_CONVERGED),
        ([FILE], ["failed"], [], Reason.APPLY_FAILED),
    ],
)
def test_apply_failure_derived_from_outcomes(
    actions: list[Action], statuses: list[str], transient: list[str], reason: Reason
) -> None:
    run = _run(actions)
    run.transient.extend(transient)
    f = _failure(run, _outcomes(run, statuses), converged=False)
    assert f.reason is reason and not f.terminal


def test_apply_failure_of_a_lost_connection_keeps_its_reason() -> None:
    run = _run([FILE])
    err = ConnectionLost("host web1: connection lost")
    run.fail(err.reason, f"apply stopped during files: {err}")
    f = _failure(run, _outcomes(run, ["skipped"]), converged=False)
    assert f.reason is Reason.CONNECTION_LOST


# ---------------------------------------------------------------- engine paths


class _Pool:
    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc

    async def get(self, host: str) -> Any:
        if self.exc is not None:
            raise self.exc
        return object()


@pytest.fixture(scope="module")
def fleet() -> Any:
    return load_fleet(EXAMPLE)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (HostKeyRefused("host web1: changed host key"), Reason.HOST_KEY_REFUSED),
        (AuthRefused("host web1: permission denied"), Reason.AUTH_REFUSED),
        (IdentityMismatch("host web1: answers as db1"), Reason.IDENTITY_MISMATCH),
        (ConnectFailed("host web1: no route"), Reason.UNREACHABLE),
        (CommandTimeout("host web1: observation timed out"), Reason.TIMEOUT),
        (ConnectionLost("host web1: reset"), Reason.CONNECTION_LOST),
        (RuntimeError("a bug"), Reason.INTERNAL_ERROR),
    ],
)
async def test_engine_connect_and_observe_failures_are_typed(
    fleet: Any, exc: BaseException, reason: Reason
) -> None:
    out = await engine._plan_one(fleet, "web1", _Pool(exc), None)
    assert out.status == engine.ERROR and out.failure is not None
    assert out.failure.reason is reason and out.failure.terminal is reason.terminal
    assert out.as_dict()["reason"] == str(reason)


async def test_engine_render_refusal_is_terminal(fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_fleet: Any, name: str) -> Desired:
        raise RenderError(f"host {name}: the firewall would not admit management SSH")

    monkeypatch.setattr(engine, "render_cached", refuse)
    out = await engine._plan_one(fleet, "web1", _Pool(), None)
    assert out.failure is not None and out.failure.reason is Reason.RENDER_REFUSED and out.failure.terminal
    assert out.error is not None and out.error.startswith("render: ")


async def test_engine_incomplete_observation_is_transient(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def observe(*_a: Any, **_k: Any) -> object:
        return object()

    monkeypatch.setattr(engine, "observe_host", observe)
    incomplete = HostPlan("web1", errors=("iptables-save failed",))
    monkeypatch.setattr(engine, "plan_host", lambda *_a, **_k: incomplete)
    out = await engine._plan_one(fleet, "web1", _Pool(), None)
    assert (
        out.failure is not None
        and out.failure.reason is Reason.OBSERVE_INCOMPLETE
        and not out.failure.terminal
    )


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (Failure(Reason.RELOAD_BROKE_SERVICE, "apache2 died"), Reason.RELOAD_BROKE_SERVICE),
        (Failure(Reason.FIREWALL_ROLLED_BACK, "cut"), Reason.FIREWALL_ROLLED_BACK),
        (Failure(Reason.DPKG_LOCKED, "locked"), Reason.DPKG_LOCKED),
        (None, Reason.APPLY_FAILED),
    ],
)
async def test_engine_apply_failure_keeps_the_apply_reason(
    failure: Failure | None, reason: Reason, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_apply(*_a: Any, **_k: Any) -> ApplyResult:
        return ApplyResult("web1", False, messages=("something failed",), failure=failure)

    monkeypatch.setattr(engine, "apply_host", fake_apply)
    planned = engine.HostOutcome("web1", engine.CHANGES, HostPlan("web1", (FILE,)), Desired(host="web1"))
    out = await engine._apply_one(planned, _Pool(), 1.0)
    assert out.status == engine.FAILED and out.failure is not None and out.failure.reason is reason
    assert "something failed" in out.failure.message


async def test_engine_apply_crash_is_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def crash(*_a: Any, **_k: Any) -> ApplyResult:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(engine, "apply_host", crash)
    planned = engine.HostOutcome("web1", engine.CHANGES, HostPlan("web1", (FILE,)), Desired(host="web1"))
    out = await engine._apply_one(planned, _Pool(), 1.0)
    assert out.failure is not None and out.failure.reason is Reason.INTERNAL_ERROR


# ---------------------------------------------------------------- the daemon's engine step


@pytest.mark.parametrize(
    "reason", [Reason.RELOAD_BROKE_SERVICE, Reason.FIREWALL_ROLLED_BACK, Reason.UNREACHABLE]
)
async def test_engine_step_raises_the_typed_error(reason: Reason, monkeypatch: pytest.MonkeyPatch) -> None:
    message = "deliberately worded to look like the other class: host key authentication timeout"

    async def fake(*_a: Any, **_k: Any) -> engine.FleetResult:
        out = engine.HostOutcome("web1", engine.FAILED, error=message, failure=Failure(reason, message))
        return engine.FleetResult((out,))

    monkeypatch.setattr(engine, "reconcile_fleet", fake)
    with pytest.raises(ReconcilerError) as info:
        await engine_step.engine_step("web1", Target("c1", None, ("web1",)), None, apply=True)
    assert info.value.reason is reason
    assert isinstance(info.value, Terminal) is reason.terminal
    assert str(info.value) == message
    assert not hasattr(engine_step, "classify_engine_error")


def test_apply_result_as_dict_shows_the_reason() -> None:
    r = ApplyResult("web1", False, failure=Failure(Reason.VALIDATION_FAILED, "x"))
    assert r.as_dict()["failure"] == {"reason": "validation-failed", "terminal": True}
    assert dataclasses.replace(r, ok=True, failure=None).as_dict()["failure"] is None
    assert apache_kind.APACHE_SERVING.startswith(prelude())
