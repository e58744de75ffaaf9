"""A package path for lab hosts: a small HTTP proxy for apt, run by the lab on the machine.

Lab hosts have no route out; their apt sources are the machine's own (they overlay its root). The
lab writes an ``Acquire::http::Proxy`` drop-in into each host (``dropin_text``) that points at this
proxy, which listens on the lab bridge's address(es) and fetches through the machine: one per lab
network the hosts are on (192.0.2.254 for 192.0.2.0/24 hosts, 198.19.255.254 for the big labs'
198.18.0.0/15 hosts; ``listen_addresses``), each host's drop-in naming its own. It forwards
only to the mirror hosts of the machine's own apt sources (``mirror_hosts``): ``GET
http://MIRROR/...`` for plain-HTTP sources and ``CONNECT MIRROR:443`` for HTTPS ones; anything
else is refused (403). Downloaded ``.deb`` files are cached on the machine (``pool/`` paths are
immutable), so seven hosts installing chrony fetch it once. When the machine's apt itself uses a
proxy (``Acquire::http::Proxy``), requests go through it.

Used by the namespace lab (``Lab.up``) and meant for VM hosts too: ``spawn``/``wait_listening``
(or ``start``), ``stop``, ``write_dropin``/``dropin_text`` are the whole interface; ``netns=``
makes the proxy listen inside a VM lab's guest network namespace while it fetches from the
machine's (docs/LAB.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from reconciler.host.netns import socket_in as netns_socket_in
from reconciler.lab import procs
from reconciler.log import get_logger

log = get_logger(__name__)

PORT = 3142  # apt-cacher-ng's port
DROPIN = "etc/apt/apt.conf.d/80reconciler-lab-proxy"  # relative to a host's root
CACHE_DIR = Path("/var/cache/reconciler-lab/apt")
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
MAX_HEAD = 16384
_URI = re.compile(r"(?:^deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S.*)$", re.MULTILINE)
_SAFE_CACHE_PATH = re.compile(r"^/[A-Za-z0-9._+~%/-]+\.deb$")


def mirror_hosts(sources: Iterable[Path] = SOURCES) -> tuple[str, ...]:
    """The host names of the machine's apt sources (http and https URIs), sorted."""
    found: set[str] = set()
    for src in sources:
        files = sorted(src.glob("*.list")) + sorted(src.glob("*.sources")) if src.is_dir() else [src]
        for f in files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            for m in _URI.finditer(text):
                for uri in m.group(1).split():
                    parts = urlsplit(uri)
                    if parts.scheme in ("http", "https") and parts.hostname:
                        found.add(parts.hostname.lower())
    return tuple(sorted(found))


def upstream_proxy() -> str | None:
    """The machine's own apt HTTP proxy, if apt is configured with one."""
    try:
        out = subprocess.run(
            ["apt-config", "shell", "P", "Acquire::http::Proxy"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"P='([^']+)'", out)
    return m.group(1) if m and m.group(1).startswith("http://") else None


def dropin_text(address: str, port: int = PORT) -> str:
    """The apt.conf.d drop-in the lab writes into a host: apt fetches through the proxy."""
    url = f"http://{address}:{port}/"
    return (
        "// written by the reconciler lab: this host reaches the machine's apt mirrors only\n"
        "// through the lab's apt proxy (reconciler/lab/aptproxy.py)\n"
        f'Acquire::http::Proxy "{url}";\nAcquire::https::Proxy "{url}";\n'
    )


def write_dropin(root: Path, address: str, port: int = PORT) -> Path:
    """Write the drop-in under ``root`` (a host's overlay upper layer or image root)."""
    path = root / DROPIN
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in (root / "etc", root / "etc/apt", path.parent):
        parent.chmod(0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dropin_text(address, port))
    tmp.chmod(0o644)
    tmp.rename(path)
    return path


def listen_addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """``address`` (one, or several: the proxy listens on each), as a non-empty tuple."""
    found = (address,) if isinstance(address, str) else tuple(dict.fromkeys(address))
    if not found:
        raise ValueError("the apt proxy needs an address to listen on")
    return found


@dataclass(frozen=True)
class ProxyHandle:
    pid: int
    start_time: int | None
    address: str  # the first of ``addresses``
    port: int
    addresses: tuple[str, ...] = ()


def start(
    address: str | Sequence[str],
    pidfile: Path,
    *,
    port: int = PORT,
    allow: Sequence[str] | None = None,
    cache_dir: Path = CACHE_DIR,
    timeout: float = 10.0,
    upstream: str | None = None,
    netns: str | None = None,
) -> ProxyHandle:
    """Start the proxy as a process of its own (it outlives ``lab up``); ``pidfile``'s path is
    on its command line, so the lab's cleanup (which kills processes naming the lab directory)
    stops it with the lab. Returns once it listens."""
    started = spawn(
        address, pidfile, port=port, allow=allow, cache_dir=cache_dir, upstream=upstream, netns=netns
    )
    return wait_listening(started, timeout)


def spawn(
    address: str | Sequence[str],
    pidfile: Path,
    *,
    port: int = PORT,
    allow: Sequence[str] | None = None,
    cache_dir: Path = CACHE_DIR,
    upstream: str | None = None,
    netns: str | None = None,
) -> Starting:
    """Start the proxy process and return at once (``wait_listening`` waits for it): the lab
    starts it before its hosts and waits after them, so it costs no bring-up time. ``netns``:
    listen inside that network namespace (a VM lab's guests reach ``address`` there), while the
    proxy itself, and every fetch, stays in the machine's namespace. Several addresses: it
    listens on each (one per lab network the hosts are on)."""
    addresses = listen_addresses(address)
    hosts = tuple(allow) if allow is not None else mirror_hosts()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    argv = [sys.executable, "-m", "reconciler.lab.aptproxy", "--port", str(port)]
    for a in addresses:
        argv += ["--listen", a]
    argv += ["--pidfile", str(pidfile), "--cache", str(cache_dir)]
    up = upstream or upstream_proxy()  # ``upstream``: a proxy to go through (else the machine's apt's)
    if up:
        argv += ["--upstream", up]
    for h in hosts:
        argv += ["--allow", h]
    if netns:  # listen inside it (a VM lab's guest network), fetch from the machine's
        argv += ["--netns", netns]
    log_path = pidfile.with_suffix(".log")
    with open(log_path, "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    return Starting(p, pidfile, addresses[0], port, addresses)


@dataclass(frozen=True)
class Starting:
    process: subprocess.Popen[bytes]
    pidfile: Path
    address: str  # the first of ``addresses``
    port: int
    addresses: tuple[str, ...] = ()


def wait_listening(s: Starting, timeout: float = 10.0) -> ProxyHandle:
    p = s.process
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(
                f"the lab's apt proxy exited ({p.returncode}): see {s.pidfile.with_suffix('.log')}"
            )
        if s.pidfile.exists() and s.pidfile.read_text().strip() == str(p.pid):
            return ProxyHandle(p.pid, procs.start_time(p.pid), s.address, s.port, s.addresses or (s.address,))
        time.sleep(0.02)
    p.kill()
    where = ", ".join(f"{a}:{s.port}" for a in s.addresses or (s.address,))
    raise RuntimeError(f"the lab's apt proxy did not listen on {where} in {timeout:.0f} s")


def stop(handle: ProxyHandle) -> None:
    if procs.kill_verified(handle.pid, handle.start_time):
        procs.wait_dead([(handle.pid, handle.start_time)], timeout=5)


# ---------------------------------------------------------------- the proxy itself


class _Proxy:
    def __init__(self, allow: Sequence[str], cache: Path, upstream: str | None) -> None:
        self.allow = {h.lower() for h in allow}
        self.cache = cache
        self.upstream = urlsplit(upstream) if upstream else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            if len(head) > MAX_HEAD:
                raise ValueError("request head too long")
            await self._serve(head, reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except ValueError as err:
            await self._reply(writer, 400, str(err))
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, code: int, why: str) -> None:
        body = f"reconciler lab apt proxy: {why}\n".encode()
        writer.write(
            f"HTTP/1.1 {code} {why[:60]}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass

    async def _serve(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise ValueError("bad request line")
        method, target, _ = parts
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            if host.lower() not in self.allow or port != "443":
                log.info("aptproxy.refused", target=target)
                await self._reply(writer, 403, f"not a mirror of the machine: {target}")
                return
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, 443), 30)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            return
        url = urlsplit(target)
        if method not in ("GET", "HEAD") or url.scheme != "http" or (url.hostname or "") not in self.allow:
            log.info("aptproxy.refused", method=method, target=target[:200])
            await self._reply(writer, 403, f"not a mirror of the machine: {target[:200]}")
            return
        if url.port not in (None, 80):
            await self._reply(writer, 403, "only port 80")
            return
        path = url.path or "/"
        cached = self._cache_path(url.hostname or "", path) if method == "GET" and not url.query else None
        if cached is not None and cached.is_file():
            size = cached.stat().st_size
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            with cached.open("rb") as f:
                while chunk := f.read(1 << 16):
                    writer.write(chunk)
                    await writer.drain()
            return
        keep = [
            ln
            for ln in lines[1:]
            if ln and ln.split(":", 1)[0].lower() not in ("connection", "proxy-connection", "keep-alive")
        ]
        if self.upstream is not None:
            conn_host, conn_port, req_target = self.upstream.hostname or "", self.upstream.port or 80, target
        else:
            conn_host, conn_port = url.hostname or "", 80
            req_target = path + (f"?{url.query}" if url.query else "")
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(conn_host, conn_port), 30)
        request = "\r\n".join([f"{method} {req_target} HTTP/1.1", *keep, "Connection: close", "", ""])
        up_w.write(request.encode("latin-1"))
        await up_w.drain()
        resp_head = await asyncio.wait_for(up_r.readuntil(b"\r\n\r\n"), 60)
        status = resp_head.split(b" ", 2)[1:2]
        writer.write(resp_head)
        tmp = None
        if cached is not None and status == [b"200"]:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{id(writer)}")
        out = tmp.open("wb") if tmp is not None else None
        try:
            while chunk := await asyncio.wait_for(up_r.read(1 << 16), 120):
                writer.write(chunk)
                if out is not None:
                    out.write(chunk)
                await writer.drain()
            if out is not None and tmp is not None:
                out.close()
                out = None
                tmp.rename(cached)  # type: ignore[arg-type]
        finally:
            if out is not None:
                out.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
            up_w.close()

    def _cache_path(self, host: str, path: str) -> Path | None:
        """Only ``.deb`` files under ``/pool/`` (immutable by name), with a plain path."""
        if "/pool/" not in path or not _SAFE_CACHE_PATH.match(path) or "/../" in path or "/./" in path:
            return None
        digest = hashlib.sha256(f"{host}{path}".encode()).hexdigest()[:16]
        return self.cache / f"{digest}-{Path(path).name}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def listening_socket(address: str, port: int, netns: str | None = None) -> socket.socket:
    """A listening TCP socket on ``address:port``; with ``netns``, created inside that network
    namespace (``/run/netns/NAME``: e.g. a VM lab's guest network, ``host.netns.socket_in``)
    while this process, and so every upstream connection, stays in the machine's own."""
    if not netns:
        return socket.create_server((address, port))
    sock = netns_socket_in(netns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def _main(args: argparse.Namespace) -> None:
    proxy = _Proxy(args.allow or (), Path(args.cache), args.upstream)
    servers = [
        await asyncio.start_server(
            proxy.handle, sock=listening_socket(address, args.port, args.netns), limit=MAX_HEAD * 2
        )
        for address in listen_addresses(args.listen)
    ]  # every socket listens before the pid file says so
    pidfile = Path(args.pidfile)
    tmp = pidfile.with_name(f".{pidfile.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.rename(pidfile)
    log.info("aptproxy.listening", addresses=args.listen, port=args.port, mirrors=args.allow)
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    try:
        await stop_event.wait()
    finally:
        for server in servers:
            server.close()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m reconciler.lab.aptproxy")
    p.add_argument("--listen", required=True, action="append", help="an address to listen on (repeatable)")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--cache", default=str(CACHE_DIR))
    p.add_argument("--upstream", default=None)
    p.add_argument("--allow", action="append", default=[])
    p.add_argument("--netns", default=None, help="listen inside this network namespace (/run/netns/NAME)")
    asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()
