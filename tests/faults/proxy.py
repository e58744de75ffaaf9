"""A fault-injecting TCP proxy in front of a real sshd (loopback only).

Modes (switchable at run time through ``FaultProxy.mode``):
- ``pass``: relay both ways;
- ``blackhole``: accept the TCP connection and never answer (a frozen sshd / dropped packets
  after the handshake);
- ``refuse``: close at once (a daemon restarting);
- ``drop_after``: relay until ``limit`` bytes went from server to client, then reset both sides
  (a connection dropped mid-transfer);
- ``freeze_after``: relay until ``limit`` bytes went from server to client, then stop relaying
  but keep both sockets open (a host that froze mid-session).
``refuse_first``: refuse that many connections before applying the mode (transient errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    mode: str = "pass"
    limit: int = 0
    refuse_first: int = 0
    accepted: int = 0
    server_bytes: int = 0  # relayed from the server to clients, all connections
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        try:
            if self.refuse_first > 0:
                self.refuse_first -= 1
                _reset(writer)
                return
            if self.mode == "refuse":
                _reset(writer)
                return
            if self.mode == "blackhole":
                await asyncio.sleep(3600)
                return
            up_r, up_w = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_w)
            await asyncio.gather(
                self._pipe(reader, up_w, False), self._pipe(up_r, writer, True), return_exceptions=True
            )
            _reset(up_w)
        except asyncio.CancelledError:
            pass
        finally:
            _reset(writer)
            self._tasks.discard(task)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, downstream: bool) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                w.close()
                return
            if downstream and self.mode in ("drop_after", "freeze_after"):
                room = self.limit - self.server_bytes
                if len(data) > room:
                    if room > 0:
                        w.write(data[:room])
                        self.server_bytes += room
                        await w.drain()
                    if self.mode == "drop_after":
                        _reset(w)
                        raise ConnectionResetError("fault: dropped")
                    await asyncio.sleep(3600)
            if downstream:
                self.server_bytes += len(data)
            w.write(data)
            await w.drain()


def _reset(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.close()
