"""The lab's package path (reconciler/lab/aptproxy.py), as a real process on loopback: it forwards
only to the machine's mirror hosts, caches .deb files from pool/ (fetched once), refuses other
hosts, ports and CONNECT targets, and never caches a path it cannot trust. The "mirror" is a
local HTTP server reached as the upstream proxy (no network)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reconciler.lab import aptproxy
from reconciler.lab.lab import proxy_addresses

DEB = b"!<arch>\nnot really a deb\n" * 100


class _Mirror(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Mirror.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(DEB)))
        self.end_headers()
        self.wfile.write(DEB)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _Mirror.seen = []
    handle = aptproxy.start(
        "127.0.0.1",
        tmp_path / "aptproxy.pid",
        port=port,
        allow=["deb.debian.org"],
        cache_dir=tmp_path / "cache",
        upstream=f"http://127.0.0.1:{mirror.server_address[1]}",
    )
    try:
        yield port, tmp_path / "cache"
    finally:
        aptproxy.stop(handle)
        mirror.shutdown()


def ask(port: int, request: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def get(port: int, url: str) -> bytes:
    return ask(port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n")


def test_a_mirror_deb_is_forwarded_once_then_served_from_the_cache(proxy: tuple[int, Path]) -> None:
    port, cache = proxy
    url = "http://deb.debian.org/debian/pool/main/c/chrony/chrony_4.3-2%2bdeb12u3_amd64.deb"
    first, second = get(port, url), get(port, url)
    assert first.startswith(b"HTTP/1.0 200") and first.endswith(DEB)
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(DEB)
    assert _Mirror.seen == [url]  # fetched once
    assert len(list(cache.iterdir())) == 1
    index = "http://deb.debian.org/debian/dists/bookworm/InRelease"
    get(port, index), get(port, index)
    assert _Mirror.seen.count(index) == 2  # index files are never cached


@pytest.mark.parametrize(
    "request_text",
    [
        "GET http://evil.example/debian/pool/x.deb HTTP/1.1\r\n\r\n",
        "GET http://deb.debian.org:8080/debian/pool/x.deb HTTP/1.1\r\n\r\n",
        "GET /debian/pool/x.deb HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n",
        "POST http://deb.debian.org/debian/ HTTP/1.1\r\n\r\n",
        "CONNECT evil.example:443 HTTP/1.1\r\n\r\n",
        "CONNECT deb.debian.org:22 HTTP/1.1\r\n\r\n",
    ],
)
def test_anything_but_the_machines_mirrors_is_refused(proxy: tuple[int, Path], request_text: str) -> None:
    port, _ = proxy
    answer = ask(port, request_text)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert _Mirror.seen == []


def test_a_path_it_cannot_trust_is_forwarded_but_never_cached(proxy: tuple[int, Path]) -> None:
    port, cache = proxy
    for url in (
        "http://deb.debian.org/debian/pool/../../etc/x.deb",
        "http://deb.debian.org/debian/pool/main/x.deb?y=1",
        "http://deb.debian.org/debian/main/x.deb",
    ):
        assert get(port, url).endswith(DEB)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_mirror_hosts_from_the_machines_sources_and_the_dropin(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: https://Security.Debian.org/debian-security\nSuites: bookworm-security\n"
    )
    (d / "extra.list").write_text("deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/apt stable main\n")
    (d / "old.list.disabled").write_text("deb http://disabled.example/ x main\n")
    (d / "local.list").write_text("deb [trusted=yes] file:/srv/repo ./\n")
    assert aptproxy.mirror_hosts([tmp_path / "missing", d]) == (
        "deb.debian.org",
        "mirror.example",
        "security.debian.org",
    )
    path = aptproxy.write_dropin(tmp_path / "root", "192.0.2.254")
    assert path == tmp_path / "root/etc/apt/apt.conf.d/80reconciler-lab-proxy"
    assert 'Acquire::http::Proxy "http://192.0.2.254:3142/";' in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a network namespace needs root")
def test_in_a_netns_it_listens_there_and_fetches_from_the_machines(tmp_path: Path) -> None:
    """The VM lab's case: guests live in a namespace of their own with no route out."""
    ns = f"rcltest-aptpx-{os.getpid()}"
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    _Mirror.seen = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    handle = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        handle = aptproxy.start(
            "127.0.0.1",
            tmp_path / "aptproxy.pid",
            port=3142,
            allow=["deb.debian.org"],
            cache_dir=tmp_path / "cache",
            upstream=f"http://127.0.0.1:{mirror.server_address[1]}",
            netns=ns,
        )
        client = (
            "import socket,sys\n"
            "s=socket.create_connection(('127.0.0.1',3142),timeout=10)\n"
            "u=b'http://deb.debian.org/debian/pool/main/t/tree/tree_2.1.0-1_amd64.deb'\n"
            "s.sendall(b'GET '+u+b' HTTP/1.1\\r\\n\\r\\n')\n"
            "out=b''\n"
            "while (c:=s.recv(65536)): out+=c\n"
            "sys.stdout.buffer.write(out)\n"
        )
        inside = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", client], capture_output=True
        )
        assert inside.stdout.endswith(DEB), inside.stderr
        assert len(_Mirror.seen) == 1  # reached the machine's loopback: the fetch ran outside the netns
        with pytest.raises(OSError):  # and nothing listens on the machine's own 127.0.0.1:3142 for it
            socket.create_connection(("127.0.0.1", 3142), timeout=2).close()
    finally:
        if handle is not None:
            aptproxy.stop(handle)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        mirror.shutdown()


def test_each_host_gets_the_proxy_on_its_own_lab_network() -> None:
    """A big lab's hosts (198.18.0.0/15) have a route to their own network only: their drop-in
    names the bridge's address there, not 192.0.2.254 (the bug: big labs could not install)."""
    via = proxy_addresses(["192.0.2.11", "198.18.0.11", "198.19.3.7"])
    assert via == {
        "192.0.2.11": "192.0.2.254",
        "198.18.0.11": "198.19.255.254",
        "198.19.3.7": "198.19.255.254",
    }
    assert aptproxy.listen_addresses(sorted(set(via.values()))) == ("192.0.2.254", "198.19.255.254")
    assert aptproxy.listen_addresses("192.0.2.254") == ("192.0.2.254",)
    with pytest.raises(ValueError):
        aptproxy.listen_addresses([])
    assert 'Proxy "http://198.19.255.254:3142/";' in aptproxy.dropin_text(via["198.18.0.11"])


def test_one_proxy_listens_on_every_address_it_is_given(tmp_path: Path) -> None:
    """Both lab networks at once (a fleet lab with hosts on both): one process, two sockets,
    and the same mirror-only policy on each."""
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _Mirror.seen = []
    handle = aptproxy.start(
        ["127.0.0.1", "127.0.0.2"],
        tmp_path / "aptproxy.pid",
        port=port,
        allow=["deb.debian.org"],
        cache_dir=tmp_path / "cache",
        upstream=f"http://127.0.0.1:{mirror.server_address[1]}",
    )
    try:
        assert handle.addresses == ("127.0.0.1", "127.0.0.2")
        url = "http://deb.debian.org/debian/pool/main/t/tree/tree_2.1.0-1_amd64.deb"
        for address in handle.addresses:
            with socket.create_connection((address, port), timeout=10) as c:
                c.sendall(f"GET {url} HTTP/1.1\r\n\r\n".encode())
                out = b""
                while chunk := c.recv(65536):
                    out += chunk
            assert out.split(b" ", 2)[1] == b"200" and out.endswith(DEB)
            with socket.create_connection((address, port), timeout=10) as c:
                c.sendall(b"GET http://evil.example/x HTTP/1.1\r\n\r\n")
                assert c.recv(100).startswith(b"HTTP/1.1 403")
        assert len(_Mirror.seen) == 1  # the second address got the cached copy
    finally:
        aptproxy.stop(handle)
        mirror.shutdown()
