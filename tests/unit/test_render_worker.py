"""The bounded render worker: a real process with real limits (time, memory, output caps), killed
by its PID on timeout, on close and on cancellation; its answers read as data only."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from services_fleets import example_fleet, motd_file

from reconciler.domains.bounded_render import (
    RenderAborted,
    RenderRejected,
    RenderWorker,
    _decode,
    render_bounded,
    render_bounded_sync,
)
from reconciler.domains.render import render_host
from reconciler.domains.render_limits import MIB, RenderLimits
from reconciler.engine import fleet as engine
from reconciler.errors import RenderError
from reconciler.fleet.model import Fleet, ManagedFile
from reconciler.kinds.resources import Desired

HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
GREEDY = (  # doubles a string 40 times: a terabyte, if nothing stopped it
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s }}"
)


def fleet_with(motd: str, *files: ManagedFile, extra: dict[str, str] | None = None) -> Fleet:
    return example_fleet(files=(motd_file(), *files), templates={"templates/motd.j2": motd, **(extra or {})})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
async def worker() -> AsyncIterator[RenderWorker]:
    w = RenderWorker(RenderLimits(timeout=2.0))
    try:
        yield w
    finally:
        await w.close()


async def test_renders_like_the_renderer_in_process(worker: RenderWorker) -> None:
    fleet = example_fleet()
    results = await worker.render(fleet, fleet.host_names())
    assert isinstance(results, dict) and list(results) == list(fleet.host_names())
    for name, desired in results.items():
        assert isinstance(desired, Desired) and desired == render_host(fleet, fleet.host(name))
    again = await worker.render(fleet, ["web1"])  # the same warm process, one job per commit
    assert isinstance(again, dict) and list(again) == ["web1"]
    assert worker.spawned == 1 and worker.jobs == 2


async def test_a_render_error_stays_the_error_of_its_host(worker: RenderWorker) -> None:
    fleet = fleet_with("{% if host.name == 'web1' %}{{ nope }}{% endif %}ok\n")
    results = await worker.render(fleet, fleet.host_names())
    assert isinstance(results, dict)
    assert isinstance(results["web1"], RenderError) and "templates/motd.j2:1" in str(results["web1"])
    assert all(isinstance(results[h], Desired) for h in ("db1", "db2", "web2"))


async def test_a_hanging_template_is_stopped_at_the_timeout_with_its_line(worker: RenderWorker) -> None:
    fleet = fleet_with("line\n" + HANG)
    await worker.start()
    first = worker.pid
    assert first is not None
    started = time.monotonic()
    result = await worker.render(fleet, fleet.host_names())
    elapsed = time.monotonic() - started
    assert isinstance(result, RenderRejected) and result.limit == "timeout"
    assert result.reason.startswith(
        "templates/motd.j2:2: template rendering took longer than 2 s (render.timeout)"
    )
    assert "(host db1)" in result.reason
    assert 1.9 < elapsed < 4.5, elapsed
    assert not alive(first)  # never reused: a new worker is already starting
    ok = await worker.render(example_fleet(), ["db1"])
    assert isinstance(ok, dict) and worker.pid not in (None, first)


async def test_a_worker_that_ignores_its_timer_is_killed_by_pid() -> None:
    """A template stuck in C code (here: the worker stopped) cannot be interrupted from inside:
    the parent kills the process at the deadline + grace."""
    w = RenderWorker(RenderLimits(timeout=1.0))
    try:
        await w.start()
        pid = w.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        result = await w.render(example_fleet(), ["web1"])
        assert isinstance(result, RenderRejected) and result.limit == "timeout"
        assert "stopped while rendering host web1" in result.reason
        assert time.monotonic() - started < 1.0 + 2.0 + 1.0
        assert not alive(pid)
    finally:
        await w.close()


async def test_memory_is_limited(worker: RenderWorker) -> None:
    small = RenderWorker(RenderLimits(timeout=10.0, memory=256 * MIB))
    try:
        started = time.monotonic()
        result = await small.render(fleet_with(GREEDY), ["web1"])
        assert isinstance(result, RenderRejected) and result.limit == "memory", result
        assert result.reason.startswith("templates/motd.j2:1: template rendering ran out of memory")
        assert "render.memory = 256 MiB" in result.reason
        assert time.monotonic() - started < 8
    finally:
        await small.close()


async def test_output_caps_per_file_and_per_host() -> None:
    limits = RenderLimits(timeout=5.0, max_file_bytes=64 * 1024, max_host_bytes=100 * 1024)
    big = await render_bounded(fleet_with("{{ 'x' * 70000 }}"), ["web1"], limits)
    assert isinstance(big, RenderRejected) and big.limit == "file-size"
    assert "templates/motd.j2: the output is larger than 64 KiB" in big.reason
    # inline content (no template) is capped after rendering, with the file's path
    inline = ManagedFile(name="blob", path="/etc/blob", content="y" * 70000, source_file="files/blob.yaml")
    fleet = replace(example_fleet(files=(motd_file(), inline), web_files=("motd", "blob")))
    blob = await render_bounded(fleet, ["web1"], limits)
    assert isinstance(blob, RenderRejected) and blob.limit == "file-size"
    assert "host web1: /etc/blob is 68.4 KiB, more than 64 KiB per file" in blob.reason
    # every file under the cap, the host over its own
    parts = tuple(
        ManagedFile(
            name=f"p{i}", path=f"/etc/p{i}", template="templates/p.j2", source_file=f"files/p{i}.yaml"
        )
        for i in range(3)
    )
    many = example_fleet(
        files=(motd_file(), *parts), web_files=("motd", "p0", "p1", "p2"),
        templates={"templates/motd.j2": "m\n", "templates/p.j2": "{{ 'z' * 40000 }}"},
    )  # fmt: skip
    host = await render_bounded(many, ["db1", "web1"], limits)
    assert isinstance(host, RenderRejected) and host.limit == "host-size"
    assert (
        host.reason.startswith("host web1: ")
        and "more than 100 KiB per host (render.max_host_bytes)" in host.reason
    )


async def test_close_kills_a_render_in_progress(worker: RenderWorker) -> None:
    task = asyncio.create_task(worker.render(fleet_with(HANG), ["web1"]))
    await asyncio.sleep(0.8)  # rendering (the worker imported, then started the loop)
    pid = worker.pid
    assert pid is not None and alive(pid)
    started = time.monotonic()
    await worker.close()
    with pytest.raises(RenderAborted):
        await task
    assert time.monotonic() - started < 1.0 and not alive(pid)


async def test_cancelling_the_caller_kills_the_worker(worker: RenderWorker) -> None:
    task = asyncio.create_task(worker.render(fleet_with(HANG), ["web1"]))
    await asyncio.sleep(0.8)
    pid = worker.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)


async def test_a_worker_that_died_idle_is_replaced_without_refusing(worker: RenderWorker) -> None:
    await worker.start()
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    results = await worker.render(example_fleet(), ["web1"])
    assert isinstance(results, dict) and isinstance(results["web1"], Desired)


async def test_the_worker_never_sees_the_daemon_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_SMTP_PASSWORD", "canary-smtp-password-4411")
    w = RenderWorker(RenderLimits())
    try:
        assert isinstance(await w.render(example_fleet(), ["web1"]), dict)  # started and set up
        assert w.pid is not None
        with open(f"/proc/{w.pid}/environ", "rb") as f:
            env = f.read()
        assert b"canary-smtp-password" not in env and b"RECONCILER_" not in env
        with open(f"/proc/{w.pid}/limits") as f:
            row = next(line for line in f if line.startswith("Max address space"))
        assert row.split()[3:5] == [str(512 * MIB)] * 2  # soft and hard: the worker cannot raise it
    finally:
        await w.close()


def test_answers_are_read_as_data_only() -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="forbidden type posix.system"):
        _decode(pickle.dumps(("ok", "web1", Evil())))
    desired = render_host(example_fleet(), example_fleet().host("web1"))
    assert _decode(pickle.dumps(("ok", "web1", desired)))[2] == desired
    with pytest.raises(pickle.UnpicklingError):
        _decode(pickle.dumps(["not", "a", "tuple"]))


def test_render_bounded_sync_and_seeding_the_engine() -> None:
    fleet = fleet_with("{% if host.name == 'db2' %}{{ nope }}{% endif %}ok\n")
    results = render_bounded_sync(fleet, fleet.host_names(), RenderLimits())
    assert isinstance(results, dict)
    engine.seed_rendered(fleet, results)
    assert engine.render_cached(fleet, "web1") is results["web1"]
    with pytest.raises(RenderError, match="nope"):
        engine.render_cached(fleet, "db2")
    partial = example_fleet()
    engine.seed_rendered(partial, {"web1": render_host(partial, partial.host("web1"))})
    with pytest.raises(RenderError, match="not rendered"):  # never rendered in process once seeded
        engine.render_cached(partial, "db1")


async def test_a_worker_that_cannot_start_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install problem is not the commit's fault: a transient error, never a rejection."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    w = RenderWorker(RenderLimits())
    try:
        with pytest.raises(RenderAborted, match=r"could not start \(exit code 1\)"):
            await w.render(example_fleet(), ["web1"])
    finally:
        await w.close()


def test_the_worker_runs_the_same_package_as_its_parent(tmp_path: Path) -> None:
    """`python -m reconciler` from a checkout imports the package from the current directory;
    the worker (which never has the current directory on its path) must run that same code."""
    root = Path(__file__).resolve().parents[2]
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("RECONCILER_")
    }
    argv = ["render", "fleet-repo-example", "--host", "web1", "--out", str(tmp_path)]
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", *argv],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "etc" / "motd").exists()


class _ByGetattr:
    """Pickles as ``getattr(cls, name)``: how Debian 12's Python 3.11.2 pickles an enum member."""

    def __init__(self, cls: object, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self) -> tuple[object, ...]:
        return (getattr, (self.cls, self.name))


def test_enum_members_pickled_by_getattr_are_accepted_and_nothing_else() -> None:
    """Found by running the image (Debian's python3): every commit was refused as 'forbidden type
    builtins.getattr'. Only a member of an allowed enum is looked up."""
    from reconciler.kinds.resources import Desired, Domain

    assert _decode(pickle.dumps(("ok", "web1", _ByGetattr(Domain, "FILES"))))[2] is Domain.FILES
    hostile = ((Desired, "__init__"), (Domain, "__class__"), (Domain, "NOPE"), (object, "__subclasses__"))
    for cls, name in hostile:
        with pytest.raises(pickle.UnpicklingError):
            _decode(pickle.dumps(("ok", "web1", _ByGetattr(cls, name))))
