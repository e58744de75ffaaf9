"""The machine the reconciler runs on, behind the Connection interface, without SSH."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Sequence

from reconciler.host.ssh import (
    CLIENT_SLACK,
    KILL_GRACE,
    CommandResult,
    CommandTimeout,
    Connection,
    ConnectionLost,
    OnClose,
)
from reconciler.host.targets import SshTarget


class LocalConnection(Connection):
    """The machine the reconciler runs on, with the Connection interface and no SSH.

    argv is executed directly (no shell); ``sudo -n --`` when not running as root; the
    command runs in its own session and its whole process group is killed on timeout.
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        semaphore: asyncio.Semaphore,
        command_timeout: float,
        on_close: OnClose | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self._setup(target, semaphore, command_timeout, on_close, time_scale, as_root=os.geteuid() == 0)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        if self._closed:
            raise ConnectionLost(f"host {self.host} (local): connection closed")
        # an explicit per-command timeout is sized for a normal host: slow hosts scale it
        limit = self._command_timeout if timeout is None else timeout * self._time_scale
        if limit <= 0:
            raise ValueError("timeout must be positive")
        async with self._sem:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._prefix,
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as err:
                return CommandResult(127, b"", f"{argv[0]}: {err.strerror}\n".encode())
            try:
                out, err_out = await asyncio.wait_for(proc.communicate(stdin or b""), limit)
            except TimeoutError:
                await _kill_group(proc)
                raise CommandTimeout(
                    f"host {self.host} (local): command {argv[0]} timed out after {limit:g} s (terminated)"
                ) from None
        return CommandResult(int(proc.returncode or 0), out, err_out)

    @contextlib.asynccontextmanager
    async def hold(
        self, argv: Sequence[str], *, limit: float, first_line_within: float
    ) -> AsyncIterator[bytes]:
        full = (*self._prefix, "timeout", "-k", f"{KILL_GRACE:g}", f"{limit:.3f}", *argv)
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), first_line_within)
            except TimeoutError:
                raise CommandTimeout(
                    f"host {self.host} (local): {argv[0]} did not answer within {first_line_within:g} s"
                ) from None
            yield line
        finally:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), KILL_GRACE + CLIENT_SLACK)
            except TimeoutError:
                await _kill_group(proc)

    async def close(self) -> None:
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE)
            break
        except TimeoutError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group
