"""Push-to-converged latency of the daemon (`reconciler run`) on N lab hosts, warm.

    sudo python bench/bench_daemon.py --hosts 10 50 [--pushes 20]

Each size: a fresh lab; a fleet made from fleet-repo-example with N hosts (roles alternate web
and db, as in the example; mesh in tunnel + libipsec, which this kernel runs); a first converge
with `reconciler apply` and `reconciler keys collect`; a bare git remote; an SMTP sink
(aiosmtpd); then a real `reconciler run` process with SSH-signed commits verified, webhooks, the
and verify-after-apply on, as a user runs it (the drift schedule at 1 h, so that a
scheduled /etc scan of every host does not land inside a measured push).

Measured: after the daemon has converged every host and one warm-up push, ``--pushes`` times a
one-file change (the motd template that every host renders into /etc/motd): edit, signed
commit, `git push` to the bare remote, a signed GitHub webhook; the clock runs from just before
`git push` until /status shows every host Ready on the new commit (polled every ``--poll``
seconds, 0.1 by default: the time is that of the first poll that saw it, so it overstates by up
to one interval, and each poll costs the daemon a full status); then
until the daemon's verify after apply has reported every host on that commit (push to verified).
Writes bench/results/daemon.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from reconciler import log as logsetup
from reconciler.fleet.load import load_fleet
from reconciler.lab import Lab, specs_from_fleet

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "daemon.md"
SECRET = "bench-webhook-secret"  # a bench value, not a real secret
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "ops@example.com",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "ops@example.com",
}


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, env={**os.environ, **GIT_ENV}
    )
    return out.stdout.decode().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.count += 1
        return "250 OK"


def make_repo(tmp: Path, n: int, smtp_port: int) -> Path:
    repo = tmp / "work"
    shutil.copytree(ROOT / "fleet-repo-example", repo)
    text = (repo / "fleet.yaml").read_text()
    text = text.replace("mode: ipip ", "mode: tunnel ").replace("datapath: kernel", "datapath: libipsec")
    text = text.replace("port: 8025", f"port: {smtp_port}")
    (repo / "fleet.yaml").write_text(text)
    for f in (repo / "hosts").glob("*.yaml"):
        f.unlink()
    for i in range(1, n + 1):
        role = "web" if i % 2 else "db"
        (repo / "hosts" / f"h{i:02d}.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Host\n"
            f"name: h{i:02d}\npublic_address: 192.0.2.{100 + i}\ninternal_address: 10.99.0.{100 + i}\n"
            f"roles: [{role}]\n"
        )
    return repo


class Bench:
    def __init__(self, tmp: Path, n: int, concurrency: int | None = None) -> None:
        self.tmp = tmp
        self.concurrency = concurrency
        self.n = n
        self.port = free_port()
        self.smtp_port = free_port()
        self.work = make_repo(tmp, n, self.smtp_port)
        self.remote = tmp / "fleet.git"
        self.key = tmp / "admin_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        kt, blob = (tmp / "admin_key.pub").read_text().split()[:2]
        self.allowed = tmp / "allowed_signers"
        self.allowed.write_text(f'ops@example.com namespaces="git" {kt} {blob}\n')
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.remote)], check=True,
                       env={**os.environ, **GIT_ENV})  # fmt: skip
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "remote", "add", "origin", str(self.remote))
        self.hosts = list(load_fleet(self.work).host_names())

    def commit_and_push(self, message: str) -> tuple[str, float]:
        """Signed commit, then push; returns (commit, monotonic time just before the push)."""
        git(self.work, "add", "-A")
        git(self.work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={self.key}",
            "commit", "-q", "-S", "-m", message)  # fmt: skip
        head = git(self.work, "rev-parse", "HEAD")
        t0 = time.monotonic()
        git(self.work, "push", "-q", "origin", "main")
        return head, t0

    def webhook(self) -> int:
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(  # noqa: S310
            f"http://127.0.0.1:{self.port}/hooks/github",
            data=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig,
                     "X-GitHub-Event": "push", "X-GitHub-Delivery": f"bench-{time.time_ns()}"},
            method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return int(resp.status)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/status"
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def wait_on(self, commit: str, timeout: float, *, poll: float = 0.02) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                hosts = self.status()["hosts"]
            except OSError:
                hosts = []
            if len(hosts) == self.n and all(
                h["state"] == "Ready" and h["applied_commit"] == commit for h in hosts
            ):
                return time.monotonic()
            time.sleep(poll)
        bad = [(h["name"], h["state"], h["reason"][:80]) for h in hosts if h["applied_commit"] != commit]
        raise SystemExit(f"bench: not converged on {commit[:12]} after {timeout:.0f} s: {bad[:5]}")

    def wait_verified(self, commit: str, timeout: float) -> float:
        """Until the daemon's verify-after-apply reports every host on ``commit``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            verify = self.status().get("verify", {})
            if len(verify) == self.n and all(v["commit"] == commit for v in verify.values()):
                return time.monotonic()
            time.sleep(0.05)
        raise SystemExit(f"bench: verify after apply did not report {commit[:12]} within {timeout:.0f} s")

    def daemon_env(self, lab: Lab) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        env.update({
            "RECONCILER_SOURCE_URL": f"file://{self.remote}",
            "RECONCILER_SOURCE_BRANCH": "main",
            "RECONCILER_SOURCE_POLL_INTERVAL": "60s",
            "RECONCILER_SOURCE_VERIFY": "ssh",
            "RECONCILER_SOURCE_ALLOWED_SIGNERS": str(self.allowed),
            "RECONCILER_SERVER_LISTEN": "127.0.0.1",
            "RECONCILER_SERVER_PORT": str(self.port),
            "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
            "RECONCILER_SSH_KNOWN_HOSTS": str(lab.info.known_hosts),
            "RECONCILER_SSH_IDENTITY": str(lab.info.client_key),
            "RECONCILER_SMTP_HOST": "127.0.0.1",
            "RECONCILER_SMTP_PORT": str(self.smtp_port),
            "RECONCILER_SMTP_TO": "ops@example.com",
            "RECONCILER_STATE_DIR": str(self.tmp / "state"),
            "RECONCILER_DRIFT_INTERVAL": "1h",  # a scheduled drift scan must not land in a measured push
            "RECONCILER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "RECONCILER_LOG_JSON": "1",
        })  # fmt: skip
        if self.concurrency is not None:
            env["RECONCILER_CONCURRENCY"] = str(self.concurrency)
        return env

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "reconciler", *args], check=True,
                       stdout=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                       if not k.startswith("RECONCILER_")})  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu_seconds(pid: int) -> float:
    """The daemon and its render worker (a long-lived child that renders each commit)."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and b"render_worker" in (entry / "cmdline").read_bytes():
                total += cpu_seconds(int(entry.name))
        except (OSError, ValueError):
            continue
    return total


def machine_cpu_seconds() -> float:
    """CPU time spent by the whole machine (every process, kernel included), in seconds."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(parts) if i not in (3, 4))  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def profiler(pid: int, push: int, phase: str = "push") -> subprocess.Popen[bytes] | None:
    """BENCH_PYSPY=PREFIX: sample the daemon with py-spy (a dev tool, not a dependency) during
    each push and its verify, into PREFIX-<phase>-<push>.txt (collapsed stacks)."""
    prefix = os.environ.get("BENCH_PYSPY")
    if not prefix:
        return None
    out = f"{prefix}-{phase}-{push}.txt"
    argv = ["py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", out]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5 if phase == "push" else 0)  # attached
    return spy


def motd_change(work: Path, text: str) -> None:
    tpl = work / "templates" / "motd.j2"
    lines = [ln for ln in tpl.read_text().splitlines() if not ln.startswith("Bench:")]
    tpl.write_text("\n".join([*lines, f"Bench: {text}"]) + "\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def bench(
    n: int, pushes: int, tmp: Path, concurrency: int | None = None, poll: float = 0.1
) -> dict[str, Any]:
    b = Bench(tmp, n, concurrency)
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=b.smtp_port)
    controller.start()
    lab = Lab.up(specs_from_fleet(load_fleet(b.work)))
    daemon: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        reach = ["--known-hosts", str(lab.info.known_hosts), "--identity", str(lab.info.client_key)]
        b.cli("apply", str(b.work), *reach, "--yes")
        b.cli("keys", "collect", str(b.work), *reach)
        first_apply = time.monotonic() - t0
        head, _ = b.commit_and_push("fleet with the hosts' public keys")
        log_path = tmp / "daemon.log"
        with log_path.open("wb") as logf:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "run"],
                env=b.daemon_env(lab),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        t0 = time.monotonic()
        daemon_first = b.wait_on(head, 600, poll=0.2) - t0
        motd_change(b.work, "warm-up")
        head, t0 = b.commit_and_push("motd: warm-up")
        b.webhook()
        warmup = b.wait_on(head, 600) - t0
        b.wait_verified(head, 600)
        times: list[float] = []
        verified: list[float] = []
        daemon_cpu: list[float] = []
        all_cpu: list[float] = []
        for i in range(pushes):
            motd_change(b.work, f"push {i}")
            c0, m0 = daemon_cpu_seconds(daemon.pid), machine_cpu_seconds()
            spy = profiler(daemon.pid, i)
            head, t0 = b.commit_and_push(f"motd: push {i}")
            assert b.webhook() == 202
            times.append(b.wait_on(head, 600, poll=poll) - t0)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                spy = profiler(daemon.pid, i, "verify")
            daemon_cpu.append(daemon_cpu_seconds(daemon.pid) - c0)
            all_cpu.append(machine_cpu_seconds() - m0)
            # the next push waits for this one's verify-after-apply, as pushes minutes apart do
            verified.append(b.wait_verified(head, 600) - t0)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            print(f"  {n} hosts, push {i}: converged {times[-1]:.2f} s (CPU: daemon {daemon_cpu[-1]:.2f} s, "
                  f"machine {all_cpu[-1]:.2f} s), verified {verified[-1]:.2f} s", flush=True)  # fmt: skip
        verify_all = b.status()["verify"]
        verify_row = verify_all[b.hosts[0]]
        failures = [f"{h}: {c['name']} {c.get('peer') or ''}: {c.get('cause', '')[:160]}"
                    for h, v in verify_all.items() for c in v["failed"]]  # fmt: skip
        for line in failures[:10]:
            print(f"  verify failure: {line}", flush=True)
        probe = lab.exec(b.hosts[-1], ["cat", "/etc/motd"]).stdout.decode(errors="replace")
        assert f"Bench: push {pushes - 1}" in probe, probe
        return {
            "hosts": n,
            "pushes": pushes,
            "first_apply": first_apply,
            "daemon_first": daemon_first,
            "warmup": warmup,
            "min": min(times),
            "median": statistics.median(times),
            "p95": percentile(times, 0.95),
            "max": max(times),
            "all": times,
            "verified_median": statistics.median(verified),
            "daemon_cpu": statistics.median(daemon_cpu),
            "machine_cpu": statistics.median(all_cpu),
            "verified_p95": percentile(verified, 0.95),
            "verify_batch": verify_row["batch_hosts"],
            "verify_probe": verify_row["datapath_probe"],
            "verify_failures": len(failures),
        }
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        controller.stop()
        lab.down()
        keep = os.environ.get("BENCH_KEEP_LOG")
        if keep and (tmp / "daemon.log").exists():
            shutil.copy(tmp / "daemon.log", keep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--hosts", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--pushes", type=int, default=20)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--concurrency", type=int, help="the daemon's concurrency (default: its own default)")
    ap.add_argument("--poll", type=float, default=0.1,
                    help="seconds between /status polls while a push converges (each poll costs the daemon a "
                    "full status; the measured time overstates by up to one interval)")  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (the lab uses network and mount namespaces)")
    logsetup.configure(json=False, level="WARNING")
    rows = []
    for n in args.hosts:
        with tempfile.TemporaryDirectory(prefix=f"bench-daemon-{n}-") as tmp:
            row = bench(n, args.pushes, Path(tmp), args.concurrency, args.poll)
        print({k: v for k, v in row.items() if k != "all"}, flush=True)
        rows.append(row)
    lines = [
        "# daemon: push-to-converged latency",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        f"Command: `python bench/bench_daemon.py --hosts {' '.join(map(str, args.hosts))} "
        f"--pushes {args.pushes} --poll {args.poll:g}`.",
        "",
        "A real `reconciler run` process (SSH-signed commits verified, GitHub webhook, verify after "
        "apply on; the drift schedule at 1 h so that a scheduled /etc scan does not land inside a "
        "measured push) against a bare git remote; lab hosts from the example fleet "
        "scaled to N (roles alternate web / db; strongSwan tunnel + libipsec full mesh). Warm: the "
        "daemon has converged every host and taken one warm-up push. Each measured push changes one "
        "file (the motd template, rendered into /etc/motd on every host): the clock runs from "
        "`git push` until /status shows every host Ready on the new commit (push to converged), and "
        "until the daemon's verify after apply has reported every host on it (push to verified: one "
        "batch, without the ping probe for a motd change). Each push waits for the previous one to "
        "be verified.",
        "",
        "| hosts | pushes | push to converged: median (s) | p95 (s) | min / max (s) "
        "| push to verified: median / p95 (s) | CPU per push: daemon / whole machine (s) "
        "| first `apply` + `keys collect` (s) | daemon start to converged (s) |",
        "|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hosts']} | {r['pushes']} | {r['median']:.2f} | {r['p95']:.2f} | "
            f"{r['min']:.2f} / {r['max']:.2f} | {r['verified_median']:.2f} / {r['verified_p95']:.2f} | "
            f"{r['daemon_cpu']:.2f} / {r['machine_cpu']:.2f} | {r['first_apply']:.1f} | "
            f"{r['daemon_first']:.1f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
