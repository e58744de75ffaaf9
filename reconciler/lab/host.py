"""One lab host: its files (host key, sshd_config, /root with the client's key), its start
(``ip netns exec NS unshare ... sh INIT``) and the readiness check (TCP connect + SSH banner)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reconciler.lab import procs
from reconciler.lab.init_script import SSHD_CONFIG
from reconciler.lab.model import LAB_NETWORK_V6, LabError, network_of
from reconciler.lab.state import atomic_write

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA..."


def new_ed25519(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return KeyPair(priv, f"{pub.decode()} {comment}")


def prepare_host_dir(hdir: Path, name: str, client_public: str) -> str:
    """Create the host's directories and files; return its public host key line."""
    for sub in ("upper", "work", "merged", "etc", "home-root/.ssh"):
        (hdir / sub).mkdir(parents=True, exist_ok=True)
    (hdir / "home-root").chmod(0o700)
    (hdir / "home-root/.ssh").chmod(0o700)
    host_key = new_ed25519(f"root@{name}")
    atomic_write(hdir / "etc/ssh_host_ed25519_key", host_key.private_openssh, 0o600)
    atomic_write(hdir / "etc/ssh_host_ed25519_key.pub", host_key.public_line + "\n", 0o644)
    atomic_write(hdir / "etc/sshd_config", SSHD_CONFIG, 0o644)
    atomic_write(hdir / "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n", 0o644)
    atomic_write(hdir / "home-root/.ssh/authorized_keys", client_public + "\n", 0o600)
    # a quiet, fast shell for root: no pyenv, no profile scripts of the machine
    atomic_write(hdir / "home-root/.bashrc", "# lab host: intentionally empty\n", 0o644)
    atomic_write(hdir / "home-root/.profile", "# lab host: intentionally empty\n", 0o644)
    return host_key.public_line


def spawn(
    init_path: Path,
    hdir: Path,
    netns: str,
    name: str,
    address: str,
    peer: str,
    tag: str,
    address_v6: str = "",
) -> subprocess.Popen[bytes]:
    argv = [
        "ip", "netns", "exec", netns,
        "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
        "--propagation", "private",
        "sh", str(init_path), str(hdir), name, f"{address}/{network_of(address)[0].prefixlen}", peer, tag,
        f"{address_v6}/{LAB_NETWORK_V6.prefixlen}" if address_v6 else "",
    ]  # fmt: skip
    with open(hdir / "console.log", "ab") as console:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=console,
            start_new_session=True,
            close_fds=True,
            env=CLEAN_ENV,
        )


def find_init_pid(unshare_pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = procs.children(unshare_pid)
        if kids:
            return kids[0]
        if not procs.is_alive(unshare_pid):
            return 0
        time.sleep(0.005)
    return 0


def ssh_banner(address: str, port: int = 22, timeout: float = 1.0) -> bool:
    """True when an SSH server answers on address:port with its version banner."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"SSH-2.0-")
    except OSError:
        return False


def console_tail(hdir: Path, lines: int = 15) -> str:
    try:
        text = (hdir / "console.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def listening(init_pid: int, port: int = 22) -> bool:
    """True when a TCP socket listens on ``port`` in the network namespace of ``init_pid``
    (read from /proc/PID/net/tcp: no packet is sent)."""
    try:
        lines = Path(f"/proc/{init_pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    want = f":{port:04X}"
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
            return True
    return False


def wait_ready(
    name: str, address: str, hdir: Path, pid: int, pid_start: int | None, timeout: float, init_pid: int = 0
) -> None:
    """Wait until sshd listens (seen in /proc, no traffic) and answers with its SSH banner."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if (not init_pid or listening(init_pid)) and ssh_banner(address):
            return
        if not procs.is_alive(pid, pid_start):
            raise LabError(f"lab host {name}: init exited before sshd was ready:\n{console_tail(hdir)}")
        if time.monotonic() > deadline:
            raise LabError(
                f"lab host {name}: sshd not reachable on {address}:22 after {timeout:.0f}s:\n"
                f"{console_tail(hdir)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)
