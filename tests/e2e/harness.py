"""The e2e harness: what every daemon test module needs, in one place.

- a signed fleet repo (``fleet_repo``): the admins' clone of a fleet, a bare remote the daemon
  fetches, an SSH signing key and the ``allowed_signers`` file the daemon verifies pushes with;
- aiosmtpd receiving the daemon's mail (``smtp_server``);
- a real ``reconciler run`` process (``spawn_daemon``: output to a log, killed with the test
  process; ``stop_daemon``: SIGTERM by PID, then the exit code);
- ``World``: one daemon on a lab with the async helpers the lab modules share (wait on /readyz,
  on every host converged, on more fetches; webhooks; /metrics samples; keys collected with the
  real ``reconciler keys collect`` and the mesh waited up by the daemon's own verify).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiosmtpd.controller import Controller

from reconciler.fleet.load import load_fleet
from reconciler.lab import Lab, specs_from_fleet

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fleet-repo-example"
WEBHOOK_SECRET = "e2e-webhook-canary-3c9d1"
SYNC_TOKEN = "e2e-sync-canary-77ab0"
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Admin",
    "GIT_AUTHOR_EMAIL": "ops@example.com",
    "GIT_COMMITTER_NAME": "Admin",
    "GIT_COMMITTER_EMAIL": "ops@example.com",
}
CONVERGE_TIMEOUT = 240.0
MESH_TIMEOUT = 240.0
DRIFT_PERIOD = 8
FETCHED = 'reconciler_source_fetches_total{result="ok"}'


# ---------------------------------------------------------------- processes, ports, git


def die_with_parent() -> None:
    """The daemon gets SIGKILL if the test process dies (no orphan daemon after a crash)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV}
    )
    return out.stdout.decode().strip()


def clean_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without any RECONCILER_ variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(settings)
    return env


def spawn_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A real ``reconciler run`` with ``env``; stdout and stderr to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 40) -> int:
    """SIGTERM to the daemon's PID, then its exit code (killed, and the test fails, after ``timeout``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def kill_daemon(proc: subprocess.Popen[bytes] | None) -> None:
    """Clean-up after a test: SIGKILL to a daemon still running."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the signed fleet repo


def libipsec_variant(work: Path) -> None:
    """The example fleet as this kernel can run it: no IP-IP and no kernel ESP, so the mesh is
    tunnel-mode IPsec over strongSwan's userspace ESP (kernel-libipsec, a TUN device)."""
    fleet_yaml = work / "fleet.yaml"
    text = fleet_yaml.read_text()
    fleet_yaml.write_text(
        text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    )


@dataclass(frozen=True)
class FleetRepo:
    work: Path  # the admins' clone
    remote: Path  # the bare repo the daemon fetches
    signing_key: Path
    allowed_signers: Path

    def commit(self, message: str, *, sign: bool = True) -> str:
        git(self.work, "add", "-A")
        args = ["commit", "-q", "-m", message]
        if sign:
            args = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.signing_key}", *args, "-S"]
        git(self.work, *args)
        return git(self.work, "rev-parse", "HEAD")

    def push(self, ref: str = "HEAD", *, force: bool = False) -> None:
        git(self.work, "push", "-q", *(["--force"] if force else []), "origin", f"{ref}:main")


def fleet_repo(
    tmp: Path, *, source: Path | None = EXAMPLE, drop_hosts: tuple[str, ...] = (), libipsec: bool = False
) -> FleetRepo:
    """A fleet repo in ``tmp/work`` (a copy of ``source``, without ``drop_hosts``; ``source=None``:
    the caller writes the files), its bare remote, and an ed25519 key that ``allowed_signers``
    trusts for ops@example.com. Nothing committed yet."""
    work = tmp / "work"
    if source is not None:
        shutil.copytree(source, work)
    else:
        work.mkdir(parents=True)
    for gone in drop_hosts:
        (work / "hosts" / f"{gone}.yaml").unlink()
    if libipsec:
        libipsec_variant(work)
    key = tmp / "admin_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(key)], check=True)
    kt, blob = (tmp / "admin_key.pub").read_text().split()[:2]
    allowed = tmp / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {kt} {blob}\n')
    remote = tmp / "fleet.git"
    git(tmp, "init", "-q", "--bare", "-b", "main", str(remote))
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", str(remote))
    return FleetRepo(work, remote, key, allowed)


def lab_daemon_settings(
    repo: FleetRepo,
    lab: Lab,
    *,
    port: int,
    smtp_port: int,
    state: Path,
    webhook_secret: str,
    sync_token: str,
) -> dict[str, str]:
    """The settings of a daemon on a lab: it fetches ``repo``'s remote (every commit signed by
    its key), reaches the lab's hosts with their known keys, listens on loopback ``port``, mails
    to aiosmtpd on ``smtp_port``."""
    info = lab.info
    return {
        "RECONCILER_SOURCE_URL": f"file://{repo.remote}",
        "RECONCILER_SOURCE_POLL_INTERVAL": "2s",
        "RECONCILER_SOURCE_VERIFY": "ssh",
        "RECONCILER_SOURCE_ALLOWED_SIGNERS": str(repo.allowed_signers),
        "RECONCILER_SERVER_LISTEN": "127.0.0.1",
        "RECONCILER_SERVER_PORT": str(port),
        "RECONCILER_SERVER_WEBHOOK_SECRET": webhook_secret,
        "RECONCILER_SERVER_SYNC_TOKEN": sync_token,
        "RECONCILER_SSH_KNOWN_HOSTS": str(info.known_hosts),
        "RECONCILER_SSH_IDENTITY": str(info.client_key),
        "RECONCILER_SMTP_HOST": "127.0.0.1",
        "RECONCILER_SMTP_PORT": str(smtp_port),
        "RECONCILER_SMTP_TO": "ops@example.com",
        "RECONCILER_STATE_DIR": str(state),
        "RECONCILER_SHUTDOWN_GRACE": "20s",
        "RECONCILER_BACKOFF_BASE": "1s",
        "RECONCILER_LOG_LEVEL": "INFO",
    }


@contextmanager
def smtp_server(handler: Any) -> Iterator[int]:
    """aiosmtpd on a free loopback port with ``handler``; yields the port."""
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


class Inbox:
    """Every message the daemon sent: (recipients, raw bytes)."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"

    def refusals(self) -> list[str]:
        return [s for s in self.subjects() if "refused" in s]

    def subjects(self) -> list[str]:
        out = []
        for _, data in self.messages:
            for line in data.decode(errors="replace").splitlines():
                if line.lower().startswith("subject:"):
                    out.append(line.split(":", 1)[1].strip())
        return out


# ---------------------------------------------------------------- one daemon on a lab


@dataclass
class World:
    tmp: Path
    lab: Lab
    repo: FleetRepo
    inbox: Inbox
    smtp_port: int
    port: int
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.repo.work

    @property
    def remote(self) -> Path:
        return self.repo.remote

    @property
    def allowed_signers(self) -> Path:
        return self.repo.allowed_signers

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            {
                **lab_daemon_settings(
                    self.repo, self.lab, port=self.port, smtp_port=self.smtp_port, state=self.state,
                    webhook_secret=WEBHOOK_SECRET, sync_token=SYNC_TOKEN,
                ),
                "RECONCILER_SOURCE_BRANCH": "main",
                "RECONCILER_DRIFT_INTERVAL": f"{DRIFT_PERIOD}s",
                "RECONCILER_BACKOFF_MAX": "10s",
                **extra,
            }
        )  # fmt: skip

    def start(self, **extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.log_path = self.tmp / f"daemon-{len(self.logs)}.log"
        self.logs.append(self.log_path)
        self.proc = spawn_daemon(self.env(**extra), self.log_path)

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        return stop_daemon(self.proc, timeout)

    def commit(self, message: str, *, sign: bool = True) -> str:
        return self.repo.commit(message, sign=sign)

    def push(self) -> None:
        self.repo.push()

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@contextmanager
def lab_world(
    lab_factory: Any,
    tmp: Path,
    *,
    drop_hosts: tuple[str, ...] = (),
    libipsec: bool = False,
    first_commit: str = "initial fleet",
) -> Iterator[World]:
    """A lab made for the fleet, the signed repo with one pushed commit, aiosmtpd; no daemon yet
    (``World.start``). Everything is stopped and the lab taken down on exit, even on failure."""
    repo = fleet_repo(tmp, drop_hosts=drop_hosts, libipsec=libipsec)
    inbox = Inbox()
    with fleet_lab(lab_factory, repo) as lab, smtp_server(inbox) as smtp_port:
        w = World(tmp, lab, repo, inbox, smtp_port, free_port(), tmp / "state")
        w.commit(first_commit)
        w.push()
        try:
            yield w
        finally:
            kill_daemon(w.proc)


@contextmanager
def fleet_lab(lab_factory: Any, repo: FleetRepo) -> Iterator[Lab]:
    """A lab made for the repo's fleet (waits for the machine's one lab), always taken down."""
    lab = lab_factory(specs_from_fleet(load_fleet(repo.work)), lock_timeout=1800)
    try:
        yield lab
    finally:
        lab.down()


# ---------------------------------------------------------------- HTTP, async


async def get_json(w: World, path: str = "/status") -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(w.base + path) as r:
        data: dict[str, Any] = await r.json()
        return data


async def wait_ready(w: World, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert w.proc is not None and w.proc.poll() is None, w.all_logs()[-3000:]
            try:
                async with s.get(w.base + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("daemon not ready\n" + w.all_logs()[-3000:])


async def wait_converged(w: World, commit: str, timeout: float = CONVERGE_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await get_json(w)
        hosts = status["hosts"]
        if hosts and all(h["state"] == "Ready" and h["applied_commit"] == commit for h in hosts):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"not converged on {commit}: {json.dumps(status, indent=1)[:4000]}")


def webhook_headers(body: bytes, delivery: str, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": delivery, "Content-Type": "application/json"}


async def send_webhook(w: World, delivery: str) -> int:
    body = json.dumps({"ref": "refs/heads/main", "delivery": delivery}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(w.base + "/hooks/github", data=body, headers=webhook_headers(body, delivery)) as r:
            return r.status


async def metric(w: World, sample: str) -> float:
    """One sample of /metrics, e.g. ``reconciler_source_fetches_total{result="ok"}`` (0 if absent)."""
    async with aiohttp.ClientSession() as s, s.get(w.base + "/metrics") as r:
        return sample_value(await r.text(), sample)


async def wait_fetches(w: World, n: int, timeout: float = 60) -> None:
    """Positive evidence that the daemon looked at the repo again: ``n`` more successful fetches."""
    start = await metric(w, FETCHED)
    deadline = time.monotonic() + timeout
    while await metric(w, FETCHED) < start + n:
        assert time.monotonic() < deadline, f"no {n} more fetches in {timeout:g} s"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- keys and the mesh


def run_keys_collect(w: World, *hosts: str) -> subprocess.CompletedProcess[bytes]:
    """The real ``reconciler keys collect`` against the lab (all hosts, or ``hosts``)."""
    only = [arg for h in hosts for arg in ("--host", h)]
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "keys", "collect", str(w.work), *only,
         "--known-hosts", str(w.lab.info.known_hosts), "--identity", str(w.lab.info.client_key)],
        capture_output=True, timeout=120, env=clean_env({"NO_COLOR": "1"}),
    )  # fmt: skip


def collect_keys(w: World) -> str:
    """``reconciler keys collect``: each host's public key (made by the apply) into the repo's
    keys/; returns its output (it commits nothing)."""
    res = run_keys_collect(w)
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out
    names = load_fleet(w.work).host_names()
    assert all((w.work / "keys" / f"{name}.pub").is_file() for name in names), out
    return out


async def mesh_links(w: World) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = (await get_json(w))["mesh"]["links"]
    return links


async def wait_mesh_up(w: World, timeout: float = MESH_TIMEOUT) -> list[dict[str, Any]]:
    """Every pair up by the daemon's own verify after apply, with no further push: a pair whose
    initiator applied before its responder (charon does not retry a refused first attempt with
    libipsec) is started again by the daemon itself (``daemon.ipsec_settle``)."""
    deadline = time.monotonic() + timeout
    links: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        links = await mesh_links(w)
        if links and all(link["state"] == "up" for link in links):
            return links
        await asyncio.sleep(1)
    raise AssertionError(f"mesh not up without another push: {links}\n" + w.all_logs()[-3000:])


# ---------------------------------------------------------------- HTTP, blocking (modules without asyncio)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (a test's own daemon)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError:
        return 0, ""


def post_webhook(url: str, body: bytes, delivery: str, secret: str) -> int:
    """POST a GitHub-style webhook signed with ``secret``; the status code."""
    req = urllib.request.Request(  # noqa: S310
        url, data=body, method="POST", headers=webhook_headers(body, delivery, secret)
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def sample_value(metrics_text: str, sample: str) -> float:
    """One sample of a /metrics text, e.g. ``reconciler_source_fetches_total{result="ok"}`` (0 if absent)."""
    for line in metrics_text.splitlines():
        if line.rsplit(" ", 1)[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_while_running(
    proc: subprocess.Popen[bytes] | None,
    cond: Callable[[], object],
    what: str,
    timeout: float,
    logs: Callable[[], str],
) -> None:
    """Poll ``cond`` until true; fails at once (with the log's tail) if the daemon exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is not None and proc.poll() is None, logs()[-3000:]
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{logs()[-3000:]}")
