"""SSH connections to fleet hosts: the only module that imports asyncssh.

Guarantees (see docs/ENGINE-CONNECTIONS.md):

- Strict host keys, always. The trusted keys of a host are the fleet's ``host_keys`` plus the
  entries of a known_hosts file given at run time (e.g. the lab's); with neither, the host is
  refused before any packet is sent. Nothing is ever written to a known_hosts file, and
  ``known_hosts=None`` (asyncssh: "accept any key") never reaches asyncssh.
- Every network step is bounded: ``connect_timeout`` covers TCP + handshake + auth, keepalives
  detect a frozen peer, every command has a timeout enforced on the host (``timeout -k``:
  TERM then KILL to the command's process group; OpenSSH refuses channel signals for root
  sessions, so we cannot rely on them) and on the client (the channel is abandoned).
- A semaphore bounds the number of connects and commands in flight across all hosts.
- Transient failures (refused, reset, unreachable, timeouts, a connection lost) are retried
  with exponential backoff and full jitter when connecting; refusals (host key, auth,
  no common algorithm) are ``Terminal`` and never retried.
- Commands are argv lists quoted with ``shlex.join``; scripts run as ``sh -c SCRIPT sh ARGS``
  so user data only travels as positional arguments or on stdin. A non-root user gets
  ``sudo -n --`` in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import asyncssh

from reconciler.errors import HostKeyRefused, Reason, Terminal, Transient
from reconciler.host import netns
from reconciler.log import get_logger

log = get_logger(__name__)

# Host side: seconds between TERM and KILL for a timed-out command. Client side: extra seconds
# to wait for the host's answer before abandoning the channel.
_KILL_GRACE = 2.0
_CLIENT_SLACK = 3.0
_MAX_COMMAND = 120_000

# Fast algorithms OpenSSH 9.x offers (asyncssh computes AES-GCM in one C call per packet;
# chacha20-poly1305 needs two). Host keys stay strictly checked: these only order the choice.
_KEX_ALGS = ("curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256")
_ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
)


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
class SshTarget:
    host: str  # fleet host name (used in messages)
    address: str  # what we connect to
    port: int = 22
    user: str = "root"
    host_keys: tuple[str, ...] = ()  # from the fleet ("ssh-ed25519 AAAA...")
    known_hosts: str | None = None  # path of a known_hosts file, e.g. the lab's
    client_keys: tuple[str, ...] = ()  # private key paths; empty = asyncssh defaults/agent
    local: bool = False  # the machine the reconciler runs on: no SSH (LocalConnection)
    netns: str | None = None  # reach the host from inside this network namespace (the lab's VMs)

    def where(self) -> str:
        return f"{self.host} ({self.address}:{self.port})"


@dataclass(frozen=True)
class CommandResult:
    exit_status: int  # negative signal number if killed by a signal
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class _Fleet(Protocol):  # the part of reconciler.fleet.model.Fleet we read
    @property
    def hosts(self) -> Sequence[Any]: ...


def targets_for(
    fleet: _Fleet,
    *,
    known_hosts: str | None,
    client_keys: Sequence[str],
    address_override: Mapping[str, str] | None = None,
    local_hosts: Sequence[str] = (),
    netns: str | None = None,
) -> dict[str, SshTarget]:
    """One SshTarget per fleet host: fleet address/port/user/host keys, plus the run-time
    known_hosts file and client keys. ``address_override`` maps host name -> address to dial;
    hosts in ``local_hosts`` are the machine the reconciler runs on (no SSH); ``netns``: dial
    every host from inside that network namespace (``/run/netns/NAME``, the lab's VM network)."""
    override = dict(address_override or {})
    out: dict[str, SshTarget] = {}
    for h in fleet.hosts:
        out[h.name] = SshTarget(
            host=h.name,
            address=override.get(h.name, str(h.public_address)),
            port=int(h.ssh.port),
            user=str(h.ssh.user),
            host_keys=tuple(h.ssh.host_keys),
            known_hosts=known_hosts,
            client_keys=tuple(client_keys),
            local=h.name in local_hosts,
            netns=netns or None,
        )
    return out


# ---------------------------------------------------------------- host keys


def _host_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_for(target: SshTarget) -> asyncssh.SSHKnownHosts:
    """The trusted keys of one target as an asyncssh known-hosts object (never None).

    Raises HostKeyRefused when no key at all is known for the host (we never trust on first use).
    """
    if not target.host_keys and target.known_hosts is not None:
        known = _known_hosts_file(target)
        keys, ca_keys, *_ = known.match(target.address, target.address, target.port)
        if not keys and not ca_keys:
            raise HostKeyRefused(
                f"host {target.where()}: no trusted host key (none in the fleet, none in "
                f"{target.known_hosts}); refusing to connect"
            )
        return known
    lines: list[str] = []
    pattern = _host_pattern(target.address, target.port)
    for key in target.host_keys:
        key = key.strip()
        if not key or "\n" in key or "\r" in key or "\0" in key:
            raise HostKeyRefused(f"host {target.where()}: malformed host key in the fleet")
        lines.append(f"{pattern} {key}")
    if target.known_hosts is not None:
        try:
            lines.append(Path(target.known_hosts).read_text(encoding="utf-8"))
        except OSError as err:
            raise HostKeyRefused(
                f"host {target.where()}: cannot read known_hosts file {target.known_hosts}: {err.strerror}"
            ) from None
    try:
        known = asyncssh.import_known_hosts("\n".join(lines) + "\n")
    except (ValueError, asyncssh.KeyImportError) as err:
        raise HostKeyRefused(f"host {target.where()}: cannot parse trusted host keys: {err}") from None
    keys, ca_keys, *_ = known.match(target.address, target.address, target.port)
    if not keys and not ca_keys:
        raise HostKeyRefused(
            f"host {target.where()}: no trusted host key (none in the fleet, none in "
            f"{target.known_hosts or 'any known_hosts file'}); refusing to connect"
        )
    return known


_KNOWN_CACHE: dict[tuple[str, int, int, int], asyncssh.SSHKnownHosts] = {}


def _known_hosts_file(target: SshTarget) -> asyncssh.SSHKnownHosts:
    """A known_hosts file parsed once per content version (path, inode, size, mtime), not once
    per host: a 100-host fleet shares one lab known_hosts file."""
    assert target.known_hosts is not None
    try:
        st = os.stat(target.known_hosts)
        key = (target.known_hosts, st.st_ino, st.st_size, st.st_mtime_ns)
        known = _KNOWN_CACHE.get(key)
        if known is not None:
            return known
        text = Path(target.known_hosts).read_text(encoding="utf-8")
    except OSError as err:
        raise HostKeyRefused(
            f"host {target.where()}: cannot read known_hosts file {target.known_hosts}: {err.strerror}"
        ) from None
    try:
        known = asyncssh.import_known_hosts(text + "\n")
    except (ValueError, asyncssh.KeyImportError) as err:
        raise HostKeyRefused(f"host {target.where()}: cannot parse trusted host keys: {err}") from None
    if len(_KNOWN_CACHE) > 16:
        _KNOWN_CACHE.clear()
    _KNOWN_CACHE[key] = known
    return known


# ---------------------------------------------------------------- connections


class Connection:
    """One open SSH connection to one host."""

    def __init__(
        self,
        target: SshTarget,
        conn: asyncssh.SSHClientConnection,
        *,
        semaphore: asyncio.Semaphore,
        command_timeout: float,
        on_close: Any = None,
        time_scale: float = 1.0,
    ) -> None:
        self.host = target.host
        self.target = target
        self._conn = conn
        self._sem = semaphore
        self._command_timeout = command_timeout
        self._time_scale = time_scale
        self._on_close = on_close
        self._prefix: tuple[str, ...] = () if target.user == "root" else ("sudo", "-n", "--")

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
        full = (*self._prefix, "timeout", "-k", f"{_KILL_GRACE:g}", f"{limit:.3f}", *argv)
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
        full = (*self._prefix, "timeout", "-k", f"{_KILL_GRACE:g}", f"{limit:.3f}", *argv)
        try:
            proc = await self._conn.create_process(shlex.join(full), encoding=None)
        except asyncssh.ChannelOpenError as err:
            raise ConnectionLost(f"host {self.target.where()}: cannot open a channel: {err.reason}") from None
        except (OSError, asyncssh.Error) as err:
            raise ConnectionLost(f"host {self.target.where()}: connection lost: {_reason(err)}") from None
        try:
            try:
                async with asyncio.timeout(first_line_within):
                    line = await proc.stdout.readline()
            except TimeoutError:
                raise CommandTimeout(
                    f"host {self.target.where()}: {argv[0]} did not answer within {first_line_within:g} s"
                ) from None
            except (OSError, asyncssh.Error) as err:
                raise ConnectionLost(f"host {self.target.where()}: connection lost: {_reason(err)}") from None
            yield _as_bytes(line)
        finally:
            with contextlib.suppress(OSError, asyncssh.Error):
                proc.stdin.write_eof()
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                async with asyncio.timeout(_KILL_GRACE + _CLIENT_SLACK):
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
                raise ConnectionLost(f"host {self.target.where()}: connection lost: {_reason(err)}") from None
            try:
                # The host kills the command at ``limit`` (and KILLs it _KILL_GRACE later); the
                # client waits a little longer for that exit, then gives up on the channel.
                async with asyncio.timeout(limit + _KILL_GRACE + _CLIENT_SLACK):
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
                raise ConnectionLost(f"host {self.target.where()}: connection lost: {_reason(err)}") from None
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
            stdout=_as_bytes(completed.stdout),
            stderr=_as_bytes(completed.stderr),
        )

    async def close(self) -> None:
        self._conn.close()
        try:
            await self._conn.wait_closed()
        except (OSError, asyncssh.Error):
            pass
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None


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
        on_close: Any = None,
        time_scale: float = 1.0,
    ) -> None:
        self.host = target.host
        self.target = target
        self._sem = semaphore
        self._command_timeout = command_timeout
        self._time_scale = time_scale
        self._on_close = on_close
        self._closed = False
        self._prefix = () if os.geteuid() == 0 else ("sudo", "-n", "--")

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
        full = (*self._prefix, "timeout", "-k", f"{_KILL_GRACE:g}", f"{limit:.3f}", *argv)
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
                await asyncio.wait_for(proc.wait(), _KILL_GRACE + _CLIENT_SLACK)
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
            await asyncio.wait_for(proc.wait(), _KILL_GRACE)
            break
        except TimeoutError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group


def _as_bytes(data: object) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    return str(data).encode()


def _reason(err: BaseException) -> str:
    if isinstance(err, asyncssh.DisconnectError):
        return err.reason or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class ConnectionPool:
    """Cached connections to many hosts; an async context manager that closes them all."""

    def __init__(
        self,
        targets: Mapping[str, SshTarget],
        *,
        connect_timeout: float = 10,
        command_timeout: float = 60,
        keepalive_interval: float = 15,
        max_concurrency: int = 100,
        keepalive_count_max: int = 3,
        retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        time_scale: float = 1.0,
    ) -> None:
        """``time_scale`` multiplies every per-command timeout the engine sets (sized for a normal
        host: a service start within 60 s...) for slow hosts, e.g. emulated VMs (5)."""
        if time_scale < 1:
            raise ValueError("time_scale must be >= 1")
        self.targets = dict(targets)
        self.time_scale = time_scale
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sem = asyncio.Semaphore(max_concurrency)
        self._cached: dict[str, Connection] = {}
        self._extra: set[Connection] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def target(self, host: str) -> SshTarget:
        try:
            return self.targets[host]
        except KeyError:
            raise Terminal(f"host {host}: not in the fleet (no SSH target)") from None

    async def get(self, host: str) -> Connection:
        """The cached connection to host, opened (with retries) on first use or after a drop."""
        lock = self._locks.setdefault(host, asyncio.Lock())
        async with lock:
            conn = self._cached.get(host)
            if conn is not None and not conn.closed:
                return conn
            if conn is not None:
                await conn.close()
            conn = await self._open(self.target(host), cached=True)
            self._cached[host] = conn
            return conn

    async def fresh(self, host: str) -> Connection:
        """A NEW connection (not cached; closed by the caller or by ``close()``)."""
        conn = await self._open(self.target(host), cached=False)
        self._extra.add(conn)
        return conn

    async def drop(self, host: str) -> None:
        """Close and forget the cached connection to host (next get() reconnects)."""
        conn = self._cached.pop(host, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        conns = list(self._cached.values()) + list(self._extra)
        self._cached.clear()
        self._extra.clear()
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def _open(self, target: SshTarget, *, cached: bool) -> Connection:
        if self._closed:
            raise Terminal("connection pool is closed")
        if target.local:
            on_close_local = None if cached else self._extra.discard
            return LocalConnection(
                target,
                semaphore=self._sem,
                command_timeout=self.command_timeout,
                on_close=on_close_local,
                time_scale=self.time_scale,
            )
        known = known_hosts_for(target)  # raises HostKeyRefused before any packet
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                async with self._sem:
                    raw = await self._connect(target, known)
            except Transient as err:
                if attempt >= self.retries:
                    raise
                delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
                log.info(
                    "ssh.retry", host=target.host, attempt=attempt + 1, delay=round(delay, 2), error=str(err)
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            log.debug("ssh.connected", host=target.host, seconds=round(time.monotonic() - started, 3))
            on_close = None if cached else self._extra.discard
            return Connection(
                target,
                raw,
                semaphore=self._sem,
                command_timeout=self.command_timeout,
                on_close=on_close,
                time_scale=self.time_scale,
            )

    async def _connect(
        self, target: SshTarget, known: asyncssh.SSHKnownHosts
    ) -> asyncssh.SSHClientConnection:
        assert known is not None, "known_hosts=None would disable host key checking"
        options: dict[str, Any] = {
            "port": target.port,
            "username": target.user,
            "known_hosts": known,
            "config": [],  # never read ~/.ssh/config (aliases, ProxyCommand, ...)
            "connect_timeout": self.connect_timeout,
            "login_timeout": self.connect_timeout,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_count_max": self.keepalive_count_max,
            "password_auth": False,
            "kbdint_auth": False,
            # per-connection cost: fast kex/cipher, no compression (the data is small)
            # "^": ours first, asyncssh's defaults after (a legacy host still negotiates)
            "kex_algs": "^" + ",".join(_KEX_ALGS),
            "encryption_algs": "^" + ",".join(_ENCRYPTION_ALGS),
            "compression_algs": ["none"],
        }
        if target.client_keys:
            options["client_keys"] = list(target.client_keys)
            options["agent_path"] = None
        try:
            if target.netns:
                # the TCP socket is made inside the namespace; host keys are still matched
                # against target.address (the socket's peer)
                options["sock"] = await netns.connect_in(
                    target.netns, target.address, target.port, self.connect_timeout
                )
            return await asyncssh.connect(target.address, **options)
        except asyncssh.HostKeyNotVerifiable as err:
            raise HostKeyRefused(
                f"host {target.where()}: host key refused (unknown or changed key; "
                f"{err.reason}); not connecting and not recording the key"
            ) from None
        except asyncssh.PermissionDenied as err:
            raise AuthRefused(
                f"host {target.where()}: authentication refused for user {target.user}: {err.reason}"
            ) from None
        except (asyncssh.KeyExchangeFailed, asyncssh.ProtocolNotSupported) as err:
            raise Terminal(f"host {target.where()}: SSH negotiation failed: {err.reason}") from None
        except (TimeoutError, asyncssh.ConnectionLost) as err:
            raise ConnectFailed(
                f"host {target.where()}: connect timed out or dropped after {self.connect_timeout:g} s"
                if isinstance(err, TimeoutError)
                else f"host {target.where()}: connection lost during connect: {_reason(err)}"
            ) from None
        except asyncssh.DisconnectError as err:
            raise ConnectFailed(
                f"host {target.where()}: disconnected during connect: {_reason(err)}"
            ) from None
        except OSError as err:
            raise ConnectFailed(f"host {target.where()}: cannot connect: {_reason(err)}") from None
