"""TCP sockets opened inside a named network namespace (``/run/netns/NAME``).

A socket belongs to the network namespace of the thread that created it, for its whole life,
whatever thread uses it later. So a short-lived thread ``setns``es into the namespace, creates
the socket and exits; the caller (the asyncio loop) connects and uses it as usual. The process
itself never changes namespace. Used by the connection layer for hosts that are only reachable
from inside a namespace (the lab's VM network, docs/LAB.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import re
import socket
import threading

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class NetnsError(OSError):
    """The namespace does not exist or cannot be entered."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, os.strerror(err))


def netns_path(name: str) -> str:
    if not _NAME.match(name):
        raise NetnsError(f"not a network namespace name: {name!r}")
    return f"{NETNS_DIR}/{name}"


def socket_in(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A new socket created inside network namespace ``name`` (not connected)."""
    path = netns_path(name)
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            result.append(NetnsError(err.errno, f"network namespace {name}: {err.strerror}"))
            return
        try:
            _setns(fd)  # this thread only; it ends right after
            result.append(socket.socket(family, kind, proto))
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result.append(err)
        finally:
            os.close(fd)

    worker = threading.Thread(target=make, name=f"netns-{name}", daemon=True)
    worker.start()
    worker.join()
    made = result[0]
    if isinstance(made, BaseException):
        raise made
    return made


async def connect_in(name: str, address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``address:port`` made from inside network namespace ``name``
    (non-blocking, ready for ``loop.create_connection(sock=...)``). Raises OSError/TimeoutError."""
    sock = socket_in(name)
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_in_sync(name: str, address: str, port: int, timeout: float) -> socket.socket:
    """Blocking variant of :func:`connect_in` (readiness probes, tools)."""
    sock = socket_in(name)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock
