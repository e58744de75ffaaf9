"""A fake host for unit tests: a temporary directory stands for the host's root, and the real
scripts run there under the local ``sh`` (as the current user, no SSH, no namespace).

It implements ``reconciler.host.script.Runner``/``Conn`` (and ``FakePool`` the ``Pool``), so
observe, verify, snapshot, packaging and deadman code runs unchanged against it. The scripts
are the real ones; what a fake host cannot rebase is the paths a script hard-codes (``/proc``,
``/run/charon.pid``...): tests pass the paths the code takes as parameters through ``path()``
(e.g. an inventory path, a log path, a declared file) so every write stays under ``root``.
Every command run is recorded in ``calls`` (to prove a plan ran nothing that mutates).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FakeResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


@dataclass
class FakeHost:
    root: Path
    host: str = "fake"
    env: Mapping[str, str] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    default_timeout: float = 60.0

    def path(self, p: str) -> str:
        """``p`` (absolute on the host) as a path under this fake host's root."""
        if not p.startswith("/"):
            raise ValueError(f"not an absolute path: {p!r}")
        return str(self.root / p.lstrip("/"))

    def write(self, p: str, data: bytes | str, mode: int = 0o644) -> Path:
        """Create the file ``p`` (rebased under root) with ``data``; its directories too."""
        target = Path(self.path(p))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        target.chmod(mode)
        return target

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> FakeResult:
        self.calls.append(tuple(argv))
        env = {**os.environ, **self.env}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=self.root,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin or b""), self.default_timeout if timeout is None else timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return FakeResult(int(proc.returncode or 0), out, err)

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> FakeResult:
        return await self.run(["sh", "-c", script, "sh", *args], stdin=stdin_after, timeout=timeout)

    async def close(self) -> None:
        return None


@dataclass
class FakePool:
    """Fake hosts by name (``reconciler.host.script.Pool``)."""

    hosts: dict[str, FakeHost]

    async def get(self, host: str) -> FakeHost:
        return self.hosts[host]

    async def fresh(self, host: str) -> FakeHost:
        return self.hosts[host]
