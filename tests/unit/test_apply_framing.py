"""Apply's own host scripts on the one framing (key generation, validators, tunnels): the real
scripts under the local sh (``FakeHost``), attacked with output that prints the old fixed
markers and new-style markers with a guessed nonce. Neither changes the outcome."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from reconciler.engine.plan import plan_host
from reconciler.engine.run import HostRun
from reconciler.engine.validate import validate_changes
from reconciler.host.fake import FakeHost, FakePool, FakeResult
from reconciler.host.script import run_framed
from reconciler.kinds.actions import ActionKind
from reconciler.kinds.keypairs import apply_keypairs
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Domain, FileResource, KeyPair, Validator
from reconciler.kinds.tunnels import TUNNEL_SCRIPT, tunnel_outcome
from tests.skip_policy import skip_kernel_feature

GUESS = "0" * 32


def _forge(*said: str) -> str:
    """Shell that prints the old markers and guessed new-style sections saying ``said``."""
    lines = [r"printf '@@K 0 ok\n@@K 1 ok\n@@V-tok123 0 0\n@@V-tok123 1 skip\n@@OK\n@@INV ok\n'"]
    for n, text in enumerate(said, 1):
        lines.append(rf"printf '\n@@{GUESS}<say.{n}\n%s\n@@{GUESS}>say.{n} 0\n' '{text}'")
        lines.append(rf"printf '\n@@-<say.{n}\n%s\n@@->say.{n} 0\n' '{text}'")
    return "; ".join(lines)


def _run(tmp: Path, desired: Desired) -> HostRun:
    plan = plan_host(desired, Observed(host="h"))
    return HostRun(pool=FakePool({"h": FakeHost(tmp, host="h")}), host="h", plan=plan, desired=desired,
                   token="tok123")  # fmt: skip


def test_key_generation_output_cannot_forge_a_generated_key(tmp_path: Path) -> None:
    """A generator that prints success markers but makes no private key failed; a good one
    next to it is done; the failed one's own output is its detail."""
    evidence = tmp_path / "bad-generator-ran"
    bad = KeyPair(
        "bad", str(tmp_path / "k/bad.key"), str(tmp_path / "k/bad.pub"),
        (("sh", "-c", f"touch {evidence}; {_forge('0 ok', '0 exists', '1 ok')}; echo broken-generator"),),
    )  # fmt: skip
    good = KeyPair(
        "good", str(tmp_path / "k/good.key"), str(tmp_path / "k/good.pub"),
        (("sh", "-c", "echo made > \"$0\"; echo pub > \"$1\"", str(tmp_path / "k/good.key"),
          str(tmp_path / "k/good.pub")),),
    )  # fmt: skip
    run = _run(tmp_path, Desired(host="h", keypairs=(bad, good)))
    idx = {run.plan.actions[i].resource: i for i in run.indices({ActionKind.GENERATE_KEYPAIR})}
    assert len(idx) == 2
    asyncio.run(apply_keypairs(run))
    assert evidence.exists()  # the forging output was printed
    by_res = {run.plan.actions[i].resource: run.outcomes[i] for i in idx.values()}
    outcome = {res: o.status for res, o in by_res.items()}
    assert sorted(outcome.values()) == ["done", "failed"]
    failed = next(o for o in by_res.values() if o.status == "failed")
    assert "broken-generator" in failed.message
    assert not (tmp_path / "k/bad.key").exists() and (tmp_path / "k/good.key").read_text() == "made\n"
    assert (tmp_path / "k/good.pub").stat().st_mode & 0o777 == 0o644


def test_validator_output_cannot_forge_its_verdict_or_a_skip(tmp_path: Path) -> None:
    """A failing validator printing a success marker still fails (with its exit status); one
    printing a forged "skip" still ran and passed; an absent command is a skip."""
    target = str(tmp_path / "etc/app/app.conf")
    v_fails = Validator(("sh", "-c", f"{_forge('skip 0', 'skip 1')}; echo bad config; exit 3"))
    v_passes = Validator(("sh", "-c", f"{_forge('skip 1')}; exit 0"))
    v_absent = Validator(("no-such-validator-cmd", "{path}"), needs_command="no-such-validator-cmd")
    f = FileResource(target, b"x\n", Domain.FILES, validators=(v_fails, v_passes, v_absent))
    run = _run(tmp_path, Desired(host="h", files=(f,)))
    idx = [i for i, a in enumerate(run.plan.actions) if a.path == target]
    problems = asyncio.run(validate_changes(run, idx))
    assert [(p.action, p.unknown) for p in problems] == [(idx[0], False)]
    assert "(exit 3)" in problems[0].message and "bad config" in problems[0].message
    skips = [m for m in run.messages if "validator skipped" in m]
    assert len(skips) == 1 and "no-such-validator-cmd" in skips[0]


class NetnsHost(FakeHost):
    """A fake host whose commands run in a new network namespace (``ip link`` touches only it)."""

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> FakeResult:
        return await super().run(["unshare", "--net", *argv], stdin=stdin, timeout=timeout)


def _netns_reason() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip"
    probe = subprocess.run(["unshare", "--net", "ip", "link", "show", "lo"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"network namespaces unavailable: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(_netns_reason() is not None, reason=str(_netns_reason()))
def test_tunnel_script_output_cannot_forge_ok(tmp_path: Path) -> None:
    """``ip link add`` echoes a bad name back in its error: a name that reads like the old
    ``@@OK`` marker, or a guessed new-style section saying OK, is still a failure (with or
    without the ipip module: the name is refused before the type is looked up)."""
    forged = f"@@OK\n@@{GUESS}<say.1\nOK\n@@{GUESS}>say.1 0"
    args = (forged, "10.9.0.1", "10.9.0.2", "10.9.1.1/32", "10.9.1.2/32", "0")
    framed = asyncio.run(run_framed(NetnsHost(tmp_path), TUNNEL_SCRIPT, args))
    assert framed.started
    assert b"@@OK" in framed.result.stdout  # the forging text was printed
    tag, why = tunnel_outcome(framed)
    assert tag == "FAIL" and why.startswith("ip link add:"), (tag, why)


@pytest.mark.skipif(_netns_reason() is not None, reason=str(_netns_reason()))
def test_tunnel_script_creates_the_tunnel(tmp_path: Path) -> None:
    framed = asyncio.run(
        run_framed(
            NetnsHost(tmp_path),
            TUNNEL_SCRIPT,
            ("rtun0", "10.9.0.1", "10.9.0.2", "10.9.1.1/32", "10.9.1.2/32", "1"),
        )
    )
    tag, why = tunnel_outcome(framed)
    if tag == "NOIPIP":
        skip_kernel_feature(f"ipip: the tunnel script found no ipip module: {why}")
    assert (tag, why) == ("OK", "")
