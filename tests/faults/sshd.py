"""A real OpenSSH sshd on 127.0.0.1 (random port) with its own host key and client key.

For connection tests that do not need a whole lab (host-key refusal, hung commands, many
connections). Needs root (sshd privilege separation) and /usr/sbin/sshd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """None if a loopback sshd can run here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (sshd privilege separation)"
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        return "OpenSSH server not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoopbackSshd:
    dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    known_hosts: Path
    client_key: Path
    host_pub: str

    @classmethod
    def start(cls, base: Path) -> LoopbackSshd:
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o700)
        hk = base / "host_ed25519"
        ck = base / "client_ed25519"
        for key in (hk, ck):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (base / "authorized_keys").write_text((base / "client_ed25519.pub").read_text())
        port = _free_port()
        host_pub = " ".join((base / "host_ed25519.pub").read_text().split()[:2])
        known = base / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        cfg = base / "sshd_config"
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {base}/sshd.pid\n"
            f"AuthorizedKeysFile {base}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxStartups 500\nMaxSessions 100\nLogLevel ERROR\n"
        )
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=open(base / "sshd.log", "ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            raise RuntimeError("loopback sshd did not start")
        return cls(base, port, proc, known, ck, host_pub)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.thaw()
            self.proc.kill()  # our own sshd, by PID; its session children exit with their channels
            self.proc.wait(timeout=10)
