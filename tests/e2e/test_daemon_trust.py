"""Issue 15 against a real `reconciler run`, lab hosts, a bare git remote and aiosmtpd.

What an attacker or a careless admin tried, in order (one daemon and one lab for the module):
a force-push back to an older signed commit ("port 8444 open again") and an unsigned commit on
top of an old one are refused and mailed once; `reconciler sync --allow-rollback` goes back on
purpose; a template that hangs, one that writes 73 MB and one that multiplies a string by three
billion are refused with their file and line while /healthz keeps answering; SIGTERM during a
hanging render stops the daemon at once and a restart does not hang; /status, / and /metrics
behind tokens on a non-loopback address.

Every "nothing happened" is asserted after positive evidence that the daemon saw the new head
(it is in /status, or the fetch counter moved), never after a bare sleep.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.lab import Lab
from tests.e2e.harness import (
    FleetRepo,
    clean_env,
    fleet_lab,
    fleet_repo,
    free_port,
    git,
    http_get,
    kill_daemon,
    lab_daemon_settings,
    post_webhook,
    sample_value,
    smtp_server,
    spawn_daemon,
    wait_while_running,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(2400)]

WEBHOOK_SECRET = "trust-e2e-webhook-canary-5b1"
SYNC_TOKEN = "trust-e2e-sync-canary-a42"
READ_TOKEN = "trust-e2e-read-canary-0d7"
METRICS_TOKEN = "trust-e2e-metrics-canary-93e"
BRIDGE = "192.0.2.254"  # the machine's address on the lab bridge: not loopback
RENDER_TIMEOUT = 3.0
HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n"


class Inbox:
    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        for line in envelope.content.decode(errors="replace").splitlines():
            if line.lower().startswith("subject:"):
                self.subjects.append(line.split(":", 1)[1].strip())
        return "250 OK"

    def about(self, commit: str) -> list[str]:
        return [s for s in self.subjects if commit[:12] in s]


class World:
    def __init__(self, tmp: Path, lab: Lab, repo: FleetRepo, smtp: int, inbox: Inbox) -> None:
        self.tmp, self.lab, self.repo, self.work = tmp, lab, repo, repo.work
        self.smtp_port, self.inbox = smtp, inbox
        self.port = free_port()
        self.host = "127.0.0.1"
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.extra: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        return clean_env(
            {
                **lab_daemon_settings(
                    self.repo, self.lab, port=self.port, smtp_port=self.smtp_port, state=self.tmp / "state",
                    webhook_secret=WEBHOOK_SECRET, sync_token=SYNC_TOKEN,
                ),
                "RECONCILER_DRIFT_INTERVAL": "0",
                "RECONCILER_BACKOFF_MAX": "5s",
                "RECONCILER_RENDER_TIMEOUT": f"{RENDER_TIMEOUT:g}s",
                **self.extra,
            }
        )  # fmt: skip

    # ---------------------------------------------------------------- process

    def start(self, **extra: str) -> float:
        """Start the daemon; returns the seconds until /healthz answered."""
        assert self.proc is None or self.proc.poll() is not None
        self.extra = extra
        self.host = extra.get("RECONCILER_SERVER_LISTEN", "127.0.0.1")
        self.token = extra.get("RECONCILER_SERVER_READ_TOKEN", "")
        log = self.tmp / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        t0 = time.monotonic()
        self.proc = spawn_daemon(self.env(), log)
        self.wait(lambda: self.get("/healthz")[0] == 200, "/healthz", timeout=30)
        return time.monotonic() - t0

    def stop(self, timeout: float = 40) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    def text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def wait(self, cond: Callable[[], object], what: str, timeout: float = 120) -> None:
        wait_while_running(self.proc, cond, what, timeout, self.text)

    # ---------------------------------------------------------------- HTTP

    def get(self, path: str, headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, str]:
        hdrs = dict(headers or {})
        if auth and self.token and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.token}"
        return http_get(f"http://{self.host}:{self.port}{path}", hdrs)

    def status(self) -> dict[str, Any]:
        code, text = self.get("/status")
        assert code == 200, (code, text)
        data: dict[str, Any] = json.loads(text)
        return data

    def fetches(self) -> float:
        return self.metric('reconciler_source_fetches_total{result="ok"}')

    def metric(self, sample: str) -> float:
        code, text = self.get("/metrics")
        assert code == 200
        return sample_value(text, sample)

    def hook(self, delivery: str) -> int:
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        return post_webhook(f"http://{self.host}:{self.port}/hooks/github", body, delivery, WEBHOOK_SECRET)

    # ---------------------------------------------------------------- git

    def commit(self, message: str, *, sign: bool = True) -> str:
        return self.repo.commit(message, sign=sign)

    def push(self, ref: str = "HEAD", *, force: bool = False) -> None:
        self.repo.push(ref, force=force)

    def motd(self, text: str) -> None:
        (self.work / "templates" / "motd.j2").write_text(text)

    def ports(self, *ports: int) -> None:
        role = self.work / "roles" / "web.yaml"
        lines = [ln for ln in role.read_text().splitlines() if "{name: extra" not in ln]
        at = lines.index("ports:") + 1
        for p in ports:
            lines.insert(at, f"  - {{name: extra{p}, port: {p}, protocol: tcp}}")
        role.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- hosts

    def rules(self, host: str = "web1") -> str:
        return self.lab.exec(host, ["iptables-save"]).stdout.decode()

    def converged(self, commit: str, timeout: float = 240) -> dict[str, Any]:
        def done() -> bool:
            hosts = self.status()["hosts"]
            return bool(hosts) and all(h["state"] == "Ready" and h["applied_commit"] == commit for h in hosts)

        self.wait(done, f"every host Ready on {commit[:12]}", timeout)
        return self.status()

    def refused(self, head: str, kind: str, timeout: float = 60) -> dict[str, Any]:
        """Until /status shows ``head`` fetched and refused as ``kind``."""

        def seen() -> bool:
            src = self.status()["source"]
            rej = src["rejection"]
            return src["head"] == head and rej is not None and rej["commit"] == head and rej["kind"] == kind

        self.wait(seen, f"{head[:12]} refused as {kind}", timeout)
        src: dict[str, Any] = self.status()["source"]
        return src


@pytest.fixture(scope="module")
def world(lab_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("trust")
    repo = fleet_repo(tmp, drop_hosts=("web2", "db2"))  # two hosts are enough for this story
    inbox = Inbox()
    with fleet_lab(lab_factory, repo) as lab, smtp_server(inbox) as smtp:
        w = World(tmp, lab, repo, smtp, inbox)
        try:
            yield w
        finally:
            kill_daemon(w.proc)


COMMITS: dict[str, str] = {}


def test_port_8444_closed_by_a_signed_commit(world: World) -> None:
    w = world
    w.ports(8444)
    COMMITS["open"] = w.commit("open port 8444")
    w.push()
    w.start()
    w.converged(COMMITS["open"])
    assert "--dport 8444 -j ACCEPT" in w.rules()
    w.ports()
    COMMITS["closed"] = w.commit("close port 8444")
    w.push()
    assert w.hook("close-1") == 202
    w.converged(COMMITS["closed"])
    assert "--dport 8444" not in w.rules()


def test_force_push_back_to_the_older_signed_commit_is_refused_and_mailed_once(world: World) -> None:
    w, old, closed = world, COMMITS["open"], COMMITS["closed"]
    w.push(old, force=True)  # someone with push rights but no signing key
    assert w.hook("rollback-1") == 202
    src = w.refused(old, "rollback")
    assert src["good"] == closed and src["rejection"]["good"] == closed
    assert f"is older than the applied commit {closed[:12]}" in src["rejection"]["reason"]
    w.wait(lambda: len(w.inbox.about(old)) == 1, "the refusal mail")
    assert "refused: rollback" in w.inbox.about(old)[0]
    before = w.fetches()
    for i in range(3):
        assert w.hook(f"rollback-more-{i}") == 202
    w.wait(lambda: w.fetches() >= before + 3, "three more fetches of the same head")
    # a second mail would have been queued by those fetches: the outbox is drained, so it would be out
    w.wait(lambda: w.metric('reconciler_mail_outbox{status="pending"}') == 0, "the outbox drained")
    assert len(w.inbox.about(old)) == 1
    status = w.status()
    assert all(h["applied_commit"] == closed for h in status["hosts"])
    assert "--dport 8444" not in w.rules()  # the port stays closed


def test_unsigned_commit_on_top_of_an_old_one_is_refused(world: World) -> None:
    w, old, closed = world, COMMITS["open"], COMMITS["closed"]
    git(w.work, "reset", "-q", "--hard", old)
    w.motd("unsigned on top of an old commit\n")
    sneaky = COMMITS["sneaky"] = w.commit("unsigned on old", sign=False)
    w.push(force=True)
    assert w.hook("sneaky-1") == 202
    src = w.refused(sneaky, "rollback")
    assert src["good"] == closed and f"commit {sneaky[:12]} is not signed" in src["rejection"]["reason"]
    w.wait(lambda: len(w.inbox.about(sneaky)) == 1, "the refusal mail")
    assert all(h["applied_commit"] == closed for h in w.status()["hosts"])


def sync(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "sync", *args],
        env=w.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_allow_rollback_goes_back_on_purpose(world: World) -> None:
    w, old, closed, sneaky = world, COMMITS["open"], COMMITS["closed"], COMMITS["sneaky"]
    refused = sync(w, "--allow-rollback", sneaky)  # the head, but not signed
    assert refused.returncode == 1 and f"commit {sneaky[:12]} is not signed" in refused.stderr, refused.stderr
    assert w.status()["source"]["good"] == closed
    w.push(old, force=True)
    w.refused(old, "rollback")
    done = sync(w, "--allow-rollback", old[:10], "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert f"rolled back to {old[:12]} (was {closed[:12]}), allowed by alice (from 127.0.0.1)" in done.stdout
    status = w.converged(old)
    assert "--dport 8444 -j ACCEPT" in w.rules()  # what the admin asked for
    last = status["source"]["last_rollback"]
    assert last["commit"] == old and last["previous"] == closed and last["by"].startswith("alice")
    assert time.time() - last["at"] < 120
    assert any(e["kind"] == "rollback" and "alice" in e["message"] for e in status["events"])
    w.wait(
        lambda: any(s == f"[reconciler] rolled back to {old[:12]}" for s in w.inbox.subjects),
        "rollback mail",
    )
    # and forward again from there: a signed commit on top of the rolled-back one
    git(w.work, "reset", "-q", "--hard", old)
    w.ports()
    w.motd("{{ host.name }} is managed by reconciler.\n")
    COMMITS["base"] = w.commit("close 8444 again")
    w.push()
    w.hook("forward-1")
    w.converged(COMMITS["base"])
    assert "--dport 8444" not in w.rules()


def test_hanging_template_is_refused_while_healthz_answers(world: World) -> None:
    w, base = world, COMMITS["base"]
    w.motd("first line\n" + HANG)
    hang = COMMITS["hang"] = w.commit("a template that never ends")
    w.push()
    assert w.hook("hang-1") == 202
    worst, samples = 0.0, 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        code, _ = w.get("/healthz")
        worst = max(worst, time.monotonic() - t0)
        samples += 1
        assert code == 200
        rej = w.status()["source"]["rejection"]
        if rej is not None and rej["commit"] == hang:
            break
        time.sleep(0.05)
    src = w.refused(hang, "render-limit", timeout=1)
    reason = src["rejection"]["reason"]
    assert "templates/motd.j2:2: template rendering took longer than 3 s (render.timeout)" in reason, reason
    assert src["good"] == base
    print(f"\nhanging template refused; /healthz: {samples} answers, slowest {worst * 1000:.0f} ms")
    assert worst < 1.0
    w.wait(lambda: len(w.inbox.about(hang)) == 1, "the refusal mail")
    assert "refused: render-limit" in w.inbox.about(hang)[0]
    assert all(h["applied_commit"] == base for h in w.status()["hosts"])


def render_worker(daemon_pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            int(stat.rsplit(")", 1)[1].split()[1]) == daemon_pid
            and b"reconciler.domains.render_worker" in cmdline
        ):
            return int(entry.name)
    return None


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_sigterm_during_a_hanging_render_and_a_restart_that_does_not_hang(world: World) -> None:
    w, base = world, COMMITS["base"]
    w.motd("again\n" + HANG.replace("100000", "99999", 1))
    hang2 = w.commit("another template that never ends")
    w.push()
    assert w.proc is not None
    pid = render_worker(w.proc.pid)
    assert pid is not None
    start_ticks = cpu_ticks(pid)
    assert w.hook("hang2-1") == 202
    w.wait(
        lambda: cpu_ticks(pid) - start_ticks > 50, "the render worker busy on the new commit (0.5 s of CPU)"
    )
    code, took = w.stop()
    print(f"\nSIGTERM during a hanging render: exit {code} after {took:.2f}s (grace 20 s)")
    assert code == 0 and took < 3.0
    assert not Path(f"/proc/{pid}").exists()
    assert hang2[:12] not in " ".join(w.inbox.subjects)  # interrupted, not refused
    # A restart: the stored good commit is the last good one, never a refused one.
    healthy = w.start()
    print(f"restart: /healthz answered after {healthy:.2f}s")
    assert healthy < 5
    st = w.status()
    assert st["source"]["good"] == base
    src = w.refused(hang2, "render-limit", timeout=60)
    assert src["good"] == base
    w.wait(lambda: len(w.inbox.about(hang2)) == 1, "the refusal mail")
    w.wait(lambda: w.get("/readyz")[0] == 200, "ready")


def test_73_mb_output_is_refused(world: World) -> None:
    w, base = world, COMMITS["base"]
    w.motd("{% for i in range(100000) %}{{ 'x' * 730 }}\n{% endfor %}")
    big = w.commit("a one-line loop of 73 MB")
    t0 = time.monotonic()
    w.push()
    w.hook("big-1")
    src = w.refused(big, "render-limit")
    print(f"\n73 MB template refused {time.monotonic() - t0:.2f}s after the push")
    assert (
        "templates/motd.j2: the output is larger than 1 MiB, the limit per file (render.max_file_bytes)"
        in (src["rejection"]["reason"])
    )
    assert src["good"] == base
    assert "x" * 100 not in w.lab.exec("web1", ["cat", "/etc/motd"]).stdout.decode()


def test_string_repetition_is_refused_and_a_fix_applies(world: World) -> None:
    w, base = world, COMMITS["base"]
    w.motd("ok\n{{ 'x' * 3000000000 }}\n")
    rep = w.commit("three billion x")
    w.push()
    w.hook("rep-1")
    src = w.refused(rep, "render-limit")
    reason = src["rejection"]["reason"]
    assert (
        "templates/motd.j2:2: template refused by the sandbox: '*' (repetition) would build 3,000,000,000"
        in reason
    )
    assert src["good"] == base and len(w.inbox.about(rep)) <= 1
    w.motd("{{ host.name }}: fixed\n")
    fixed = w.commit("fixed")
    w.push()
    w.hook("fixed-1")
    w.converged(fixed)
    assert w.status()["source"]["rejection"] is None
    assert "web1: fixed" in w.lab.exec("web1", ["cat", "/etc/motd"]).stdout.decode()


def test_status_behind_tokens_beyond_loopback(world: World) -> None:
    w = world
    assert w.stop()[0] == 0
    w.extra = {"RECONCILER_SERVER_LISTEN": BRIDGE}
    refused = subprocess.run([sys.executable, "-m", "reconciler", "run"], env=w.env(), capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    assert refused.returncode == 1 and "server.read_token: required when server.listen is '192.0.2.254'" in (
        refused.stderr
    )
    w.start(
        RECONCILER_SERVER_LISTEN=BRIDGE,
        RECONCILER_SERVER_READ_TOKEN=READ_TOKEN,
        RECONCILER_SERVER_METRICS_TOKEN=METRICS_TOKEN,
    )
    for path in ("/status", "/", "/metrics"):
        assert w.get(path, auth=False)[0] == 401
        assert w.get(path, {"Authorization": "Bearer wrong"})[0] == 401
        assert w.get(path)[0] == 200
    basic = "Basic " + base64.b64encode(f"ops:{READ_TOKEN}".encode()).decode()
    assert w.get("/", {"Authorization": basic})[0] == 200  # a browser on the status page
    assert w.get("/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"})[0] == 200
    assert w.get("/status", {"Authorization": f"Bearer {METRICS_TOKEN}"})[0] == 401
    assert w.get("/healthz", auth=False)[0] == 200
    w.wait(lambda: w.get("/readyz", auth=False)[0] == 200, "ready")
    assert w.hook("tokens-1") == 202  # webhooks: HMAC only
    done = sync(w, "--host", "web1")  # `reconciler sync` finds the daemon on its listen address
    assert done.returncode == 0, done.stderr
    code, took = w.stop()
    assert code == 0
    text = w.text()
    for secret in (WEBHOOK_SECRET, SYNC_TOKEN, READ_TOKEN, METRICS_TOKEN):
        assert secret not in text
