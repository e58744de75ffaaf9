"""One SSH connection to one fleet host, and the errors of every connection.

asyncssh is imported only here, in host_keys.py (trusted keys) and connection.py (the pool).

Commands are argv lists quoted with ``shlex.join`` (``sudo -n --`` in front for a non-root user),
with a timeout enforced on the host (``timeout -k``: OpenSSH refuses channel signals for root
sessions) and on the client (the channel is abandoned). The pool's guarantees: connection.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncssh

from reconciler.errors import Reason, Terminal, Transient
from reconciler.host.targets import SshTarget

# Host side: seconds between TERM and KILL for a timed-out command. Client side: extra seconds
# to wait for the host's answer before abandoning the channel.
KILL_GRACE = 2.0
CLIENT_SLACK = 3.0
_MAX_COMMAND = 120_000


class AuthRefused(Terminal):
    """The host refused our credentials (wrong user, key not authorised, sudo needs a password)."""

    reason = Reason.AUTH_REFUSED


class ConnectFailed(Transient):
    """The host could not be reached (refused, reset, unreachable, timed out, dropped)."""

    reason = Reason.UNREACHABLE


class CommandTimeout(Transient):
    """A command did not finish within its timeout; it was terminated on the host."""

    reason = Reason.TIMEOUT


class ConnectionLost(Transient):
    """The connection dropped while a command ran."""

    reason = Reason.CONNECTION_LOST


@dataclass(frozen=True)
class CommandResult:
    exit_status: int  # negative signal number if killed by a signal
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


OnClose = Callable[["Connection"], object]  # the pool forgets a closed connection


class Connection:
    """One open SSH connection to one host."""

    def __init__(
        self,
        target: SshTarget,
        conn: asyncssh.SSHClientConnection,
        *,
        semaphore: asyncio.Semaphore,
        command_timeout: float,
        on_close: OnClose | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self._conn = conn
        self._setup(target, semaphore, command_timeout, on_close, time_scale, as_root=target.user == "root")

    def _setup(
        self,
        target: SshTarget,
        semaphore: asyncio.Semaphore,
        command_timeout: float,
        on_close: OnClose | None,
        time_scale: float,
        *,
        as_root: bool,
    ) -> None:
        self.host = target.host
        self.target = target
        self._sem = semaphore
        self._command_timeout = command_timeout
        self._time_scale = time_scale
        self._on_close = on_close
        self._prefix: tuple[str, ...] = () if as_root else ("sudo", "-n", "--")

    @property
    def closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run argv on the host (quoted with shlex.join; ``sudo -n --`` for a non-root user).

        The host enforces the timeout too (coreutils ``timeout -k``: TERM, then KILL, to the
        command's whole process group), because OpenSSH refuses channel signals for root
        sessions. A non-zero exit is returned, not raised. Raises CommandTimeout / ConnectionLost.
        """
        if not argv:
            raise ValueError("empty argv")
        # an explicit per-command timeout is sized for a normal host: slow hosts scale it
        limit = self._command_timeout if timeout is None else timeout * self._time_scale
        if limit <= 0:
            raise ValueError("timeout must be positive")
        full = (*self._prefix, "timeout", "-k", f"{KILL_GRACE:g}", f"{limit:.3f}", *argv)
        command = shlex.join(full)
        if len(command) > _MAX_COMMAND:
            # sshd hands the command to the login shell as ONE argument (Linux: 128 KiB max)
            raise Terminal(
                f"host {self.target.where()}: command {argv[0]} is {len(command)} bytes long, "
                f"over the {_MAX_COMMAND} bytes a remote command line can hold; send data on stdin"
            )
        return await self._exec(command, stdin, limit, label=argv[0])

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run our own POSIX sh script as ``sh -c SCRIPT sh ARGS...``; user data goes only in
        ``args`` (positional parameters $1...) or on stdin (``stdin_after``)."""
        return await self.run(["sh", "-c", script, "sh", *args], stdin=stdin_after, timeout=timeout)

    @contextlib.asynccontextmanager
    async def hold(
        self, argv: Sequence[str], *, limit: float, first_line_within: float
    ) -> AsyncIterator[bytes]:
        """Run argv and keep it running for the duration of the ``async with`` block (a lock
        held by a remote process); yields the first line it prints (read within
        ``first_line_within`` s, else CommandTimeout). Leaving the block closes its stdin: the
        command sees EOF and ends. The host ends it after ``limit`` s in any case, and sshd ends
        it when the connection drops (a crashed reconciler holds nothing)."""
        full = (*self._prefix, "timeout", "-k", f"{KILL_GRACE:g}", f"{limit:.3f}", *argv)
        try:
            proc = await self._conn.create_process(shlex.join(full), encoding=None)
        except asyncssh.ChannelOpenError as err:
            raise ConnectionLost(f"host {self.target.where()}: cannot open a channel: {err.reason}") from None
        except (OSError, asyncssh.Error) as err:
            raise self._lost(err) from None
        try:
            try:
                async with asyncio.timeout(first_line_within):
                    line = await proc.stdout.readline()
            except TimeoutError:
                raise CommandTimeout(
                    f"host {self.target.where()}: {argv[0]} did not answer within {first_line_within:g} s"
                ) from None
            except (OSError, asyncssh.Error) as err:
                raise self._lost(err) from None
            yield as_bytes(line)
        finally:
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.stdin.write_eof()
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                async with asyncio.timeout(KILL_GRACE + CLIENT_SLACK):
                    await proc.wait()
            proc.close()

    async def _exec(self, command: str, stdin: bytes | None, limit: float, *, label: str) -> CommandResult:
        started = time.monotonic()
        async with self._sem:
            try:
                proc = await self._conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as err:
                raise ConnectionLost(
                    f"host {self.target.where()}: cannot open a channel: {err.reason}"
                ) from None
            except (OSError, asyncssh.Error) as err:
                raise self._lost(err) from None
            try:
                # The host kills the command at ``limit`` (and KILLs it KILL_GRACE later); the
                # client waits a little longer for that exit, then gives up on the channel.
                async with asyncio.timeout(limit + KILL_GRACE + CLIENT_SLACK):
                    if stdin:
                        proc.stdin.write(stdin)
                    proc.stdin.write_eof()
                    completed = await proc.wait()
            except TimeoutError:
                raise CommandTimeout(
                    f"host {self.target.where()}: command {label} timed out after {limit:g} s "
                    "(no answer from the host)"
                ) from None
            except (OSError, asyncssh.Error) as err:
                raise self._lost(err) from None
            finally:
                proc.close()
        status = completed.returncode
        if status is None:
            raise ConnectionLost(f"host {self.target.where()}: connection lost while {label} ran")
        if status in (124, 137) and time.monotonic() - started >= limit - 0.05:
            raise CommandTimeout(
                f"host {self.target.where()}: command {label} timed out after {limit:g} s "
                "(terminated on the host)"
            )
        return CommandResult(
            exit_status=int(status),
            stdout=as_bytes(completed.stdout),
            stderr=as_bytes(completed.stderr),
        )

    def _lost(self, err: BaseException) -> ConnectionLost:
        return ConnectionLost(f"host {self.target.where()}: connection lost: {ssh_reason(err)}")

    async def close(self) -> None:
        self._conn.close()
        try:
            await self._conn.wait_closed()
        except (OSError, asyncssh.Error):
            pass
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None


def as_bytes(data: object) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    return str(data).encode()


def ssh_reason(err: BaseException) -> str:
    if isinstance(err, asyncssh.DisconnectError):
        return err.reason or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
