"""A real `reconciler run` process without lab hosts: source trust, mail, webhooks, restart.

The fleet's hosts have no trusted host key here, so the daemon never opens a connection (every
host is Stalled with that reason); what is tested is everything before SSH: signed and unsigned
pushes, an invalid fleet, one mail per refused commit, forged and replayed webhooks, SIGTERM and
a restart that sends no mail twice. Runs in seconds and needs no root.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    FETCHED,
    clean_env,
    fleet_repo,
    free_port,
    git,
    http_get,
    kill_daemon,
    post_webhook,
    sample_value,
    smtp_server,
    spawn_daemon,
    stop_daemon,
    wait_while_running,
)

SECRET = "src-e2e-webhook-canary-9e1"


class Inbox:
    def __init__(self) -> None:
        self.subjects: list[str] = []  # commit refusals
        self.stalls: list[str] = []  # hosts stalled on a commit (here: no trusted host key)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        for line in envelope.content.decode(errors="replace").splitlines():
            if line.lower().startswith("subject:"):
                subject = line.split(":", 1)[1].strip()
                (self.stalls if " stalled on commit " in subject else self.subjects).append(subject)
        return "250 OK"


class Daemon:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.port = int(env["RECONCILER_SERVER_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        log = self.tmp / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = spawn_daemon(self.env, log)
        self.wait(lambda: self.get("/readyz")[0] == 200, "ready")

    def stop(self) -> int:
        assert self.proc is not None
        return stop_daemon(self.proc, timeout=30)

    def get(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def metric(self, sample: str) -> float:
        """One sample of /metrics, e.g. ``reconciler_source_fetches_total{result="ok"}`` (0 if absent)."""
        code, text = self.get("/metrics")
        assert code == 200, text
        return sample_value(text, sample)

    def wait_fetches(self, n: int) -> None:
        """Positive evidence that the daemon looked again: ``n`` more successful fetches."""
        start = self.metric(FETCHED)
        self.wait(lambda: self.metric(FETCHED) >= start + n, f"{n} more fetches")

    def status(self) -> dict[str, Any]:
        code, text = self.get("/status")
        assert code == 200
        data: dict[str, Any] = json.loads(text)
        return data

    def hook(self, body: bytes, delivery: str, secret: str = SECRET) -> int:
        return post_webhook(f"http://127.0.0.1:{self.port}/hooks/github", body, delivery, secret)

    def wait(self, cond: Any, what: str, timeout: float = 30) -> None:
        wait_while_running(self.proc, cond, what, timeout, self.text)

    def text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, Path, Inbox]]:
    tmp = tmp_path_factory.mktemp("src-e2e")
    repo = fleet_repo(tmp)
    inbox = Inbox()
    (tmp / "empty_known_hosts").write_text("")
    with smtp_server(inbox) as smtp_port:
        env = clean_env(
            {
                "RECONCILER_SOURCE_URL": f"file://{repo.remote}",
                "RECONCILER_SOURCE_POLL_INTERVAL": "1s",
                "RECONCILER_SOURCE_VERIFY": "ssh",
                "RECONCILER_SOURCE_ALLOWED_SIGNERS": str(repo.allowed_signers),
                "RECONCILER_SERVER_PORT": str(free_port()),
                "RECONCILER_SERVER_WEBHOOK_SECRET": SECRET,
                "RECONCILER_SMTP_HOST": "127.0.0.1",
                "RECONCILER_SMTP_PORT": str(smtp_port),
                "RECONCILER_STATE_DIR": str(tmp / "state"),
                "RECONCILER_SSH_KNOWN_HOSTS": str(tmp / "empty_known_hosts"),
                "RECONCILER_DRIFT_INTERVAL": "0",
                "RECONCILER_LOG_LEVEL": "INFO",
            }
        )
        daemon = Daemon(tmp, env)
        try:
            yield daemon, repo.work, repo.signing_key, inbox
        finally:
            kill_daemon(daemon.proc)


def commit(work: Path, key: Path | None, message: str) -> str:
    git(work, "add", "-A")
    if key is None:
        git(work, "commit", "-q", "-m", message)
    else:
        git(work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S", "-m", message)
    git(work, "push", "-q", "--force", "origin", "HEAD:main")
    return git(work, "rev-parse", "HEAD")


def test_source_trust_mail_webhooks_and_restart(setup: tuple[Daemon, Path, Path, Inbox]) -> None:
    d, work, key, inbox = setup
    good = commit(work, key, "initial")
    d.start()
    d.wait(lambda: d.status()["source"]["good"] == good, "first good commit")
    hosts = d.status()["hosts"]
    assert {h["name"] for h in hosts} == {"db1", "db2", "web1", "web2"}
    d.wait(lambda: all(h["state"] == "Stalled" for h in d.status()["hosts"]), "hosts stalled")
    assert all("no trusted host key" in h["reason"] for h in d.status()["hosts"])

    # An unsigned push: refused, status says why, one mail, even after many polls and webhooks.
    (work / "templates" / "motd.j2").write_text("unsigned\n")
    bad = commit(work, None, "unsigned")
    assert d.hook(b"{}", "u-1") == 202
    d.wait(lambda: len(inbox.subjects) >= 1, "refusal mail")
    for i in range(3):
        d.hook(b"{}", f"u-more-{i}")
    d.wait_fetches(3)  # the daemon fetched the same refused head again (webhooks, polls)
    st = d.status()["source"]
    assert st["good"] == good and st["head"] == bad and st["rejection"]["kind"] == "unsigned"
    assert len(inbox.subjects) == 1 and bad[:12] in inbox.subjects[0]

    # A signed but invalid fleet: refused, one more mail.
    git(work, "reset", "-q", "--hard", good)
    (work / "hosts" / "web2.yaml").write_text("apiVersion: reconciler/v1\nkind: Host\nname: Web2!\n")
    invalid = commit(work, key, "invalid host")
    d.hook(b"{}", "i-1")
    d.wait(lambda: len(inbox.subjects) >= 2, "invalid-fleet mail")
    d.wait_fetches(2)
    st = d.status()["source"]
    assert st["good"] == good and st["rejection"]["kind"] == "invalid-fleet"
    assert "hosts/web2.yaml" in st["rejection"]["reason"]
    assert len(inbox.subjects) == 2 and invalid[:12] in inbox.subjects[1]
    # the documented metrics count what happened (docs/DEPLOY.md)
    assert d.metric('reconciler_source_rejected_commits_total{reason="unsigned"}') == 1
    assert d.metric('reconciler_source_rejected_commits_total{reason="invalid-fleet"}') == 1
    d.wait(lambda: d.metric('reconciler_mail_outbox{status="pending"}') == 0, "outbox drained")
    assert d.metric('reconciler_mail_outbox{status="sent"}') == len(inbox.subjects) + len(inbox.stalls)
    page = d.get("/")[1]
    assert "invalid-fleet" in page or "hosts/web2.yaml" in page

    # Forged and replayed webhooks.
    assert d.hook(b"{}", "forged", secret="not-the-secret") == 401
    assert d.hook(b"{}", "i-1") == 200  # the same delivery id again: a no-op

    # SIGTERM, restart: the last good commit is remembered, no mail is sent twice.
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 10
    d.start()
    assert d.status()["source"]["good"] == good
    d.wait_fetches(3)  # several polls over the same refused head
    assert d.status()["source"]["head"] == invalid
    assert len(inbox.subjects) == 2
    # each host's stall (host-key-refused on the good commit) was mailed once, not again after
    # the restart (the stall is kept in the state store: the commit is not tried again)
    assert sorted(s.split()[1] for s in inbox.stalls) == ["db1", "db2", "web1", "web2"], inbox.stalls
    assert all(good[:12] in s and "host-key-refused" in s for s in inbox.stalls)

    # A fixed, signed commit is applied as the new good commit.
    git(work, "reset", "-q", "--hard", good)
    (work / "templates" / "motd.j2").write_text("fixed {{ host.name }}\n")
    fixed = commit(work, key, "fixed")
    d.hook(b"{}", "f-1")
    d.wait(lambda: d.status()["source"]["good"] == fixed, "fixed commit")
    assert d.status()["source"]["rejection"] is None
    assert d.stop() == 0
    assert SECRET not in d.text()
