"""observe's real script and plan on a fake host (reconciler.host.fake): a temporary directory
stands for the host's root, the paths the code takes as parameters are rebased under it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from reconciler.engine.identity import IDENTITY_PATH
from reconciler.engine.observe import observe_host
from reconciler.engine.plan import plan_host
from reconciler.host.fake import FakeHost
from reconciler.host.state import INVENTORY_PATH, PENDING_RELOADS_PATH
from reconciler.kinds.observed import Observed
from reconciler.kinds.resources import Desired, Domain, FileResource

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="observe judges directories by owner: the fake host's root must be root's"
)


def desired_for(host: FakeHost, files: dict[str, bytes]) -> Desired:
    return Desired(
        host=host.host,
        files=tuple(FileResource(host.path(p), body, Domain.FILES) for p, body in sorted(files.items())),
    )


async def observe(host: FakeHost, desired: Desired) -> Observed:
    return await observe_host(
        host,
        desired,
        inventory_path=host.path(INVENTORY_PATH),
        pending_path=host.path(PENDING_RELOADS_PATH),
        identity_path=host.path(IDENTITY_PATH),
        timeout=60,
    )


async def test_observe_and_plan_a_fake_host_without_changing_it(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "root")
    host.write("/etc/app/app.conf", b"x = 1\n")
    desired = desired_for(host, {"/etc/app/app.conf": b"x = 1\n", "/etc/app/new.conf": b"new\n"})
    before = sorted(p.relative_to(host.root) for p in host.root.rglob("*"))
    obs = await observe(host, desired)
    assert obs.errors == ()
    conf, new = host.path("/etc/app/app.conf"), host.path("/etc/app/new.conf")
    assert obs.files[conf].sha256 == hashlib.sha256(b"x = 1\n").hexdigest() and not obs.files[new].exists
    plan = plan_host(desired, obs)
    changed = {a.path for a in plan.actions if a.path in (conf, new)}
    assert changed == {new}
    # observing and planning ran only our own read-only scripts and changed nothing
    assert host.calls and all(c[:2] == ("sh", "-c") for c in host.calls)
    assert sorted(p.relative_to(host.root) for p in host.root.rglob("*")) == before


async def test_a_managed_file_printing_frame_markers_is_read_as_it_is(tmp_path: Path) -> None:
    """The diff fetch reads the file's content inside a frame; content that looks like a frame
    end (any nonce but this run's) stays content."""
    host = FakeHost(tmp_path / "root")
    hostile = b"a\n\n@@" + b"0" * 32 + b">content.0 0\n\n@@" + b"0" * 32 + b"<files\nb\n"
    host.write("/etc/app/app.conf", hostile)
    desired = desired_for(host, {"/etc/app/app.conf": b"a\n"})
    obs = await observe(host, desired)
    assert obs.errors == ()
    assert obs.files[host.path("/etc/app/app.conf")].content == hostile
    assert len(host.calls) == 2  # the observation, then the content fetch for the diff
