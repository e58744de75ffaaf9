"""A fake host for unit tests: a temporary directory stands for the host's root, and the real
scripts run there under the local ``sh`` (as the current user, no SSH, no namespace).

It implements ``reconciler.host.script.Runner``/``Conn`` (and ``FakePool`` the ``Pool``), so
observe, verify, snapshot, packaging and deadman code runs unchanged against it. The scripts
are the real ones. Paths the code takes as parameters (an inventory path, a log path, a
declared file) are rebased by the test through ``path()``; paths a script hard-codes
(``/var/log/kern.log``...) are rebased with ``bind``: each such directory is bind-mounted from
under ``root`` in a private mount namespace of each command (needs root and ``unshare``:
``bind_supported()`` says whether this machine can). Every write stays under ``root``.
Every command run is recorded in ``calls`` (to prove a plan ran nothing that mutates).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# $1 = how many (source, target) pairs follow, then the pairs, then the command
_BIND = r"""n=$1; shift
while [ "$n" -gt 0 ]; do mount --bind "$1" "$2" || exit 125; shift 2; n=$((n - 1)); done
exec "$@"
"""


def bind_supported() -> str | None:
    """None when ``FakeHost.bind`` works here, else why not (for a test's skip reason)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare for private mounts"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"mount namespaces unavailable: {probe.stderr.decode().strip()}"
    return None


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
    bind: tuple[str, ...] = ()  # host directories seen from under root (private mounts)

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
        if self.bind:
            mounts = [w for d in self.bind for w in (self.path(d), d)]
            argv = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND, "bind",
                str(len(self.bind)), *mounts, *argv,
            ]  # fmt: skip
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
