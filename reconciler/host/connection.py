"""Connections to fleet hosts, cached per host: the pool every stage reaches hosts through.

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

The pool lives here; one SSH connection in ssh.py, the local machine in local.py, whom to dial
in targets.py, which host keys to trust in host_keys.py. Their names are importable from here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import asyncssh

from reconciler.errors import HostKeyRefused, Terminal, Transient
from reconciler.host import netns
from reconciler.host.host_keys import known_hosts_for
from reconciler.host.local import LocalConnection
from reconciler.host.ssh import (
    AuthRefused,
    CommandResult,
    CommandTimeout,
    ConnectFailed,
    Connection,
    ConnectionLost,
    ssh_reason,
)
from reconciler.host.targets import SshTarget, targets_for
from reconciler.log import get_logger

__all__ = [
    "AuthRefused",
    "CommandResult",
    "CommandTimeout",
    "ConnectFailed",
    "Connection",
    "ConnectionLost",
    "ConnectionPool",
    "LocalConnection",
    "SshTarget",
    "known_hosts_for",
    "targets_for",
]

log = get_logger(__name__)


# Fast algorithms OpenSSH 9.x offers (asyncssh computes AES-GCM in one C call per packet;
# chacha20-poly1305 needs two). Host keys stay strictly checked: these only order the choice.
_KEX_ALGS = ("curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256")
_ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
)


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
                else f"host {target.where()}: connection lost during connect: {ssh_reason(err)}"
            ) from None
        except asyncssh.DisconnectError as err:
            raise ConnectFailed(
                f"host {target.where()}: disconnected during connect: {ssh_reason(err)}"
            ) from None
        except OSError as err:
            raise ConnectFailed(f"host {target.where()}: cannot connect: {ssh_reason(err)}") from None
