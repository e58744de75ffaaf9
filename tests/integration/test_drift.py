"""Drift scans against lab hosts: real sshd, real git, a real aiosmtpd SMTP server on loopback.

One lab (the example fleet's four hosts) for the whole module.
"""

from __future__ import annotations

import dataclasses
import email
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.controller import Controller

from reconciler import cli
from reconciler.drift.history import HistoryRepo
from reconciler.drift.scan import DriftScanner, HostDrift
from reconciler.fleet.load import load_fleet
from reconciler.fleet.model import DriftMode, DriftPolicy, Fleet, MailSettings, Notifications, SmtpSettings
from reconciler.host.connection import ConnectionPool, targets_for
from reconciler.kinds.resources import Desired, Domain, FileResource
from reconciler.lab import Lab, specs_from_fleet
from reconciler.notify.outbox import Outbox
from reconciler.usecases import enforce_with_engine

pytestmark = [pytest.mark.lab]

REPO = Path(__file__).resolve().parents[2] / "fleet-repo-example"
CANARY = "CANARY-shadow-5e7a0c"
SEED_DENIAL = (
    "Nov 25 10:00:00 db1 kernel: [ 123.456] audit(1290000000.123:42): type=1503 "
    'operation="inode_create" requested_mask="w::" denied_mask="w::" fsuid=106 '
    'name="/data/var/mysql" pid=2345 profile="/usr/sbin/mysqld"'
)


# ---------------------------------------------------------------- SMTP on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


class SmtpServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.sink = Sink()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def take(self) -> list[Message]:
        out, self.sink.messages = self.sink.messages, []
        return out


def body(m: Message) -> str:
    payload = m.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def example() -> Fleet:
    return load_fleet(REPO)


@pytest.fixture(scope="module")
def lab(lab_factory: Any, example: Fleet) -> Iterator[Lab]:
    lab = lab_factory(specs_from_fleet(example), lock_timeout=3600)  # the machine-wide lab is shared
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def fleet_with(example: Fleet, smtp: SmtpServer, **drift: Any) -> Fleet:
    mail = MailSettings(to=("ops@example.com",), sender="reconciler@example.com",
                        smtp=SmtpSettings(host="127.0.0.1", port=smtp.port))  # fmt: skip
    policy = dataclasses.replace(
        DriftPolicy(), exclude=("/etc/mtab", "/etc/ld.so.cache", "/etc/adjtime"), **drift
    )
    return dataclasses.replace(example, notifications=Notifications(mail=mail), drift=policy)


def pool_for(lab: Lab, fleet: Fleet) -> ConnectionPool:
    targets = targets_for(
        fleet, known_hosts=str(lab.info.known_hosts), client_keys=[str(lab.info.client_key)]
    )
    return ConnectionPool(targets, connect_timeout=10, command_timeout=120)


def sh(lab: Lab, host: str, script: str) -> str:
    res = lab.exec(host, ["sh", "-c", script])
    assert res.returncode == 0, res.stderr
    return res.stdout.decode()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={repo}", *args], check=True, capture_output=True, text=True
    ).stdout


class Env:
    def __init__(self, tmp: Path, lab: Lab, fleet: Fleet, smtp: SmtpServer) -> None:
        self.tmp, self.lab, self.fleet, self.smtp = tmp, lab, fleet, smtp
        self.state = tmp / "state"
        self.history = HistoryRepo.open(tmp / "history", self.state)
        self.outbox = Outbox.in_state_dir(self.state, backoff_base=0)

    def scanner(self, **kw: Any) -> DriftScanner:
        return DriftScanner(self.fleet, self.history, self.outbox, self.state, fleet_commit="f00d", **kw)

    async def scan(self, host: str, **kw: Any) -> HostDrift:
        async with pool_for(self.lab, self.fleet) as pool:
            [res] = await self.scanner(**kw).scan(pool, [host])
        assert res.ok, res.error
        return res

    async def deliver(self) -> list[Message]:
        mail = self.fleet.notifications.mail
        assert mail is not None
        await self.outbox.deliver_due(mail.smtp, timeout=5)
        return self.smtp.take()


# ---------------------------------------------------------------- tests


async def test_history_mail_secrets_outage_and_crash_recovery(
    tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer
) -> None:
    env = Env(tmp_path, lab, fleet_with(example, smtp), smtp)
    first = await env.scan("web1")
    assert first.baseline and first.commit and first.entries > 100
    assert await env.deliver() == []  # the initial snapshot is not mailed
    assert git(env.history.path, "ls-tree", "--name-only", "main", "hosts/web1/etc/hosts").strip()

    # 1. edit /etc/hosts by hand: one commit with exactly that diff, one mail with the diff
    sh(lab, "web1", "echo '192.0.2.99 drifted-host' >> /etc/hosts")
    r = await env.scan("web1")
    assert r.commit and r.changed == ("/etc/hosts",) and r.new == () and r.drift == ("/etc/hosts",)
    assert git(env.history.path, "diff", "--name-only", f"{r.commit}^", r.commit).split() == [
        "hosts/web1/etc/hosts",
        "meta/web1.json",
    ]
    file_diff = git(env.history.path, "diff", f"{r.commit}^", r.commit, "--", "hosts/web1/etc/hosts")
    assert [ln for ln in file_diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")] == [
        "+192.0.2.99 drifted-host"
    ]
    msg = git(env.history.path, "log", "-1", "--format=%an <%ae>%n%B", r.commit)
    assert msg.startswith("reconciler <reconciler@localhost>\nweb1: 1 changed, 0 new, 0 removed in /etc")
    assert "Fleet-Commit: f00d" in msg
    [m] = await env.deliver()
    assert m["Subject"] == "[reconciler] web1: 1 changed, 0 new, 0 removed in /etc"
    assert "+192.0.2.99 drifted-host" in body(m) and r.commit in body(m)

    # 2. a second scan with no change: no commit, no mail
    r = await env.scan("web1")
    assert r.commit is None and r.mails_queued == 0
    assert await env.deliver() == []

    # 3. a new file is listed; /etc/shadow changes are recorded by keyed hash only
    sh(lab, "web1", "echo 'new=1' > /etc/drift-new.conf")
    sh(lab, "web1", f"echo 'canary:{CANARY}:19000:0:99999:7:::' >> /etc/shadow")
    r = await env.scan("web1")
    assert r.new == ("/etc/drift-new.conf",) and r.secret_changed == ("/etc/shadow",)
    [m] = await env.deliver()
    assert m["Subject"] == "[reconciler] web1: 1 changed, 1 new, 0 removed in /etc"
    text = body(m)
    assert "/etc/drift-new.conf" in text and "New files in /etc on web1" in text
    assert "/etc/shadow (secret (content hidden))" in text
    assert CANARY not in text and CANARY not in m.as_string()
    everything = git(env.history.path, "log", "-p", "--all")
    assert CANARY not in everything
    shadow_marker = git(env.history.path, "show", "main:hosts/web1/etc/shadow")
    assert shadow_marker.startswith("# reconciler: secret") and "root:" not in shadow_marker
    objects = subprocess.run(
        ["git", f"--git-dir={env.history.path}", "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True,
        check=True,
    ).stdout
    assert CANARY.encode() not in objects

    # 4. SMTP down: the mail waits in the outbox, then arrives exactly once
    smtp.stop()
    try:
        sh(lab, "web1", "echo '# outage' >> /etc/drift-new.conf")
        r = await env.scan("web1")
        assert r.mails_queued == 1
        mail = env.fleet.notifications.mail
        assert mail is not None
        rep = await env.outbox.deliver_due(mail.smtp, timeout=3)
        assert rep.sent == 0 and env.outbox.counts().pending == 1
    finally:
        smtp.start()
    [m] = await env.deliver()
    assert "+# outage" in body(m)
    assert await env.deliver() == []

    # 5. crash between commit and enqueue: the next scan makes no new commit and mails once
    def crash_after(step: str) -> Any:
        def hook(name: str) -> None:
            if name == step:
                raise RuntimeError(f"simulated crash at {name}")

        return hook

    sh(lab, "web1", "echo '192.0.2.98 crash-one' >> /etc/hosts")
    scanner = env.scanner()
    scanner.crash_hook = crash_after("after-commit")
    async with pool_for(lab, env.fleet) as pool:
        with pytest.raises(RuntimeError):
            await scanner.scan_host(await pool.get("web1"))
    head = git(env.history.path, "rev-parse", "main").strip()
    assert env.outbox.counts().pending == 0
    r = await env.scan("web1")
    assert r.commit is None and r.mails_queued == 1  # no second commit; the mail is rebuilt from git
    assert git(env.history.path, "rev-parse", "main").strip() == head
    [m] = await env.deliver()
    assert "+192.0.2.98 crash-one" in body(m) and head in body(m)

    # 6. crash between enqueue and send (and before the mailed ref moved): nothing doubles
    sh(lab, "web1", "echo '192.0.2.97 crash-two' >> /etc/hosts")
    scanner = env.scanner()
    scanner.crash_hook = crash_after("after-enqueue")
    async with pool_for(lab, env.fleet) as pool:
        with pytest.raises(RuntimeError):
            await scanner.scan_host(await pool.get("web1"))
    assert env.outbox.counts().pending == 1
    restarted = Outbox.in_state_dir(env.state, backoff_base=0)  # a new process
    env.outbox = restarted
    r = await env.scan("web1")
    assert r.commit is None and r.mails_queued == 0
    msgs = await env.deliver()
    assert len(msgs) == 1 and "+192.0.2.97 crash-two" in body(msgs[0])
    assert await env.deliver() == []
    commits = git(env.history.path, "rev-list", "main", "--", "meta/web1.json").split()
    assert len(commits) == 6  # baseline + hosts + new/shadow + outage + crash-one + crash-two


async def test_apparmor_denial_suggested_and_mailed_once(
    tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer
) -> None:
    env = Env(tmp_path, lab, fleet_with(example, smtp), smtp)
    await env.scan("db1")  # baseline (kernel log cursor recorded too)
    await env.deliver()
    # /data does not exist on lab hosts (it would be the machine's own root): the rules come
    # from the line itself (the old inode_create hook on an extension-less name: a directory)
    lab.exec(
        "db1",
        ["sh", "-c", "mkdir -p /var/log && cat >> /var/log/kern.log"],
        input=(SEED_DENIAL + "\n").encode(),
    )
    r = await env.scan("db1")
    [s] = r.suggestions
    assert s.local_file == "/etc/apparmor.d/local/usr.sbin.mysqld"
    assert s.rules == ("/data/var/mysql/ r,", "/data/var/mysql/** rwk,")
    [m] = await env.deliver()
    assert m["Subject"] == "[reconciler] db1: 1 new AppArmor denial(s)"
    assert "/data/var/mysql/** rwk," in body(m) and "usr.sbin.mysqld" in body(m)
    # the same denial again (mysqld retries): no new mail
    lab.exec("db1", ["sh", "-c", "cat >> /var/log/kern.log"], input=(SEED_DENIAL + "\n").encode())
    r = await env.scan("db1")
    assert r.suggestions == () and await env.deliver() == []


async def test_managed_drift_enforce_and_report(
    tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer
) -> None:
    path = "/etc/reconciler-managed.conf"
    want = b"managed by the fleet\n"

    def render(fleet: Fleet, host: Any) -> Desired:
        return Desired(host=host.name, files=(FileResource(path=path, content=want, domain=Domain.FILES),))

    calls: list[tuple[str, tuple[str, ...]]] = []

    async def enforce(host: str, paths: Sequence[str]) -> None:
        calls.append((host, tuple(paths)))
        lab.exec(host, ["sh", "-c", f"cat > {path}"], input=want)  # what the engine would do

    env = Env(tmp_path, lab, fleet_with(example, smtp, mode=DriftMode.ENFORCE), smtp)
    sh(lab, "web2", f"printf 'managed by the fleet\\n' > {path}")
    await env.scan("web2", render=render, enforce=enforce)
    assert calls == []
    sh(lab, "web2", f"echo 'edited by hand' >> {path}")
    r = await env.scan("web2", render=render, enforce=enforce)
    assert calls == [("web2", (path,))] and r.enforcement == "put back by the engine"
    [m] = await env.deliver()
    assert "Managed by the fleet and now different from it (drift mode enforce)" in body(m)
    assert "Enforcement: put back by the engine" in body(m) and "+edited by hand" in body(m)
    # the put-back is recorded, but it is not drift: no mail
    r = await env.scan("web2", render=render, enforce=enforce)
    assert r.commit and r.drift == () and r.managed_drift == ()
    assert await env.deliver() == []
    # without an engine: report only, and the alert says so
    sh(lab, "web2", f"echo 'edited again' >> {path}")
    r = await env.scan("web2", render=render)
    assert "enforcement unavailable" in r.enforcement
    [m] = await env.deliver()
    assert "Enforcement: enforcement unavailable" in body(m)
    # mode report, with an engine at hand: the drift is seen and mailed, the host never changed
    env.fleet = fleet_with(example, smtp, mode=DriftMode.REPORT)
    sh(lab, "web2", f"echo 'edited in report mode' >> {path}")
    r = await env.scan("web2", render=render, enforce=enforce)
    assert r.commit and r.enforcement == "drift mode report: not put back", r
    [m] = await env.deliver()  # positive evidence first: this scan saw the edit
    assert "+edited in report mode" in body(m), body(m)
    assert calls == [("web2", (path,))]  # the engine was not called again
    assert "edited in report mode" in sh(lab, "web2", f"cat {path}")


async def test_managed_drift_is_put_back_by_the_real_engine(
    tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer
) -> None:
    """mode enforce with the engine's own enforcer (``usecases.enforce_with_engine``, what ``reconciler drift
    --enforce`` uses): a hand edit of a managed file (/etc/motd, from the fleet's template) is
    put back by a real reconcile of the host, and the alert says so."""
    fleet = fleet_with(example, smtp, mode=DriftMode.ENFORCE)
    env = Env(tmp_path, lab, fleet, smtp)
    async with pool_for(lab, fleet) as pool:
        scanner = env.scanner(enforce=enforce_with_engine(fleet, pool))
        [first] = await scanner.scan(pool, ["web2"])  # baseline (the engine brings web2 in line)
        assert first.ok, first.error
        managed = sh(lab, "web2", "cat /etc/motd")
        assert "managed by reconciler" in managed
        await env.deliver()
        sh(lab, "web2", "echo 'edited by hand' >> /etc/motd")
        [r] = await scanner.scan(pool, ["web2"])
    assert r.ok and r.enforcement == "put back by the engine", r
    assert sh(lab, "web2", "cat /etc/motd") == managed  # the engine, not the test, wrote it back
    mails = await env.deliver()
    assert any(
        "+edited by hand" in body(m) and "Enforcement: put back by the engine" in body(m) for m in mails
    )


def test_cli_drift_json_one_failed_host(tmp_path: Path, lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    sh(lab, "db2", "iptables -I INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset")
    try:
        argv = [
            "drift", str(REPO), "--known-hosts", str(lab.info.known_hosts),
            "--identity", str(lab.info.client_key),
            "--state", str(tmp_path / "state"), "--json", "--no-mail", "--connect-timeout", "3",
        ]  # fmt: skip
        code = cli.main(argv)
        out = json.loads(capsys.readouterr().out)
    finally:
        sh(lab, "db2", "iptables -D INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset")
    assert code == 1
    by = {h["host"]: h for h in out["hosts"]}
    assert set(by) == {"web1", "web2", "db1", "db2"}
    assert not by["db2"]["ok"] and by["db2"]["error"]
    assert all(by[h]["ok"] and by[h]["baseline"] for h in ("web1", "web2", "db1"))
    assert (tmp_path / "state" / "history").stat().st_mode & 0o777 == 0o700
    # text output, second run: no change on the reachable hosts
    code = cli.main(argv[:-4] + ["--no-mail", "--host", "web1"])
    assert code == 0
    assert "web1: no change" in capsys.readouterr().out


# ---------------------------------------------------------------- drift that cannot be blinded

BAD_NAME = b"/etc/bad\xffname.conf"
VANISH_SHIM = '#!/bin/sh\nrm -f /etc/drift-vanish.conf\nexec /usr/bin/sha256sum "$@"\n'


async def test_drift_cannot_be_blinded(tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer) -> None:
    """A non-UTF-8 name, a 40 GB sparse file, an unreadable file, a FIFO and a file that
    vanishes mid-scan, all at once: the scan takes seconds, records the rest and reports them."""
    host = "db2"
    env = Env(tmp_path, lab, fleet_with(example, smtp), smtp)
    sh(lab, host, "echo 'will vanish' > /etc/drift-vanish.conf")
    await env.scan(host)
    await env.deliver()
    # an unreadable regular file (root gets EACCES: a write-only procfs file, bound read-only);
    # the shim (fault injection, first on sshd's PATH) deletes a file after find listed it
    setup = (
        "printf 'weird=1\\n' > \"$1\" && truncate -s 40G /etc/drift-big.img"
        " && mkfifo /etc/drift-fifo && : > /etc/drift-unreadable.conf"
        " && mount --bind /proc/sys/vm/compact_memory /etc/drift-unreadable.conf"
        " && mount -o remount,ro,bind /etc/drift-unreadable.conf"
        " && echo '192.0.2.77 still-recorded' >> /etc/hosts"
        " && mkdir -p /usr/local/bin && cat > /usr/local/bin/sha256sum && chmod 755 /usr/local/bin/sha256sum"
    )
    bad = os.fsdecode(BAD_NAME)
    res = lab.exec(host, ["sh", "-c", setup, "sh", bad], input=VANISH_SHIM.encode())
    try:
        assert res.returncode == 0, res.stderr
        await _blinding_attempts_fail(env, lab, host)
    finally:
        cleanup = (
            "umount /etc/drift-unreadable.conf; rm -f /usr/local/bin/sha256sum"
            ' "$1" /etc/drift-big.img /etc/drift-fifo /etc/drift-unreadable.conf'
        )
        lab.exec(host, ["sh", "-c", cleanup, "sh", bad])


async def _blinding_attempts_fail(env: Env, lab: Lab, host: str) -> None:
    assert lab.exec(host, ["cat", "/etc/drift-unreadable.conf"]).returncode != 0  # unreadable, really
    blocks = sh(lab, host, "stat -c '%s %b %B' /etc/drift-big.img").split()
    assert int(blocks[0]) == 40 << 30 and int(blocks[1]) * int(blocks[2]) < 1 << 20  # sparse
    started = time.monotonic()
    r = await env.scan(host)
    took = time.monotonic() - started
    assert took < 10, f"scan took {took:.1f} s"
    bad = os.fsdecode(BAD_NAME)
    assert r.changed == ("/etc/hosts",) and r.removed == ("/etc/drift-vanish.conf",)
    assert set(r.new) == {bad, "/etc/drift-big.img", "/etc/drift-fifo", "/etc/drift-unreadable.conf"}
    assert "/etc/drift-vanish.conf vanished during the scan" in r.warnings
    assert "/etc/drift-unreadable.conf could not be read: recorded as unreadable" in r.warnings
    # history: the name as bytes, the big file by size/mtime/ends, the unreadable one marked
    ls_tree = ["ls-tree", "-r", "-z", "--name-only", "main", f"hosts/{host}"]
    tree = subprocess.run(
        ["git", f"--git-dir={env.history.path}", *ls_tree], capture_output=True, check=True
    ).stdout.split(b"\0")
    assert f"hosts/{host}".encode() + BAD_NAME in tree
    meta = json.loads(git(env.history.path, "show", f"main:meta/{host}.json"))
    assert meta["/etc/drift-big.img"]["stored"] == "large" and meta["/etc/drift-big.img"]["size"] == 40 << 30
    assert meta["/etc/drift-unreadable.conf"]["stored"] == "unreadable"
    assert meta["/etc/drift-fifo"]["kind"] == "other"
    # the mail: one, escaped name, the notes
    [m] = await env.deliver()
    text = body(m).replace("\r\n", "\n")
    assert m["Subject"] == f"[reconciler] {host}: 1 changed, 4 new, 1 removed in /etc"
    assert (
        "  /etc/bad\\xffname.conf\n" in text and "+++ b/etc/bad\\xffname.conf" in text and "+weird=1" in text
    )
    assert (
        "  /etc/drift-big.img (large file: recorded by size, mtime and a hash of its first and last 64 KiB)"
        in text
    )
    assert "  /etc/drift-unreadable.conf (could not be read: content unknown)" in text
    assert (
        "Not recorded normally this scan (the rest was):\n" in text and "+192.0.2.77 still-recorded" in text
    )
    # the JSON view shows the name escaped too
    assert "/etc/bad\\xffname.conf" in r.as_dict()["new"]  # type: ignore[operator]
    # the next scan (all still there) is quiet and fast
    started = time.monotonic()
    again = await env.scan(host)
    assert time.monotonic() - started < 10 and again.commit is None and again.mails_queued == 0


# ---------------------------------------------------------------- secrets by path and by content


def pem(label: str, body: str) -> str:
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


SECRET_FILES: dict[str, str] = {
    # the four reported forms
    "/etc/letsencrypt/archive/example.com/privkey1.pem": pem("PRIVATE KEY", "MIIE{c}"),
    "/etc/kubernetes/admin.conf": "apiVersion: v1\nusers:\n- name: admin\n  user:\n    client-key-data: {c}\n",  # noqa: E501
    "/etc/app/server.pem": pem("RSA PRIVATE KEY", "MIIEow{c}"),
    "/etc/postfix/sasl_passwd": "[smtp.example.com]:587 relay-user:{c}\n",
    # *.key, an OpenSSH key, a PGP private block (the last two found by their content only)
    "/etc/app/tls.key": "{c}\n",
    "/etc/app/deploy-identity": pem("OPENSSH PRIVATE KEY", "b3BlbnNzaC1rZXk{c}"),
    "/etc/app/signing.asc": pem("PGP PRIVATE KEY BLOCK", "\nlQVYBF{c}"),
}
WRITE = 'mkdir -p "$(dirname "$1")" && cat >> "$1"'


async def test_canary_secrets_never_leave_the_host(
    tmp_path: Path, lab: Lab, example: Fleet, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    host = "db1"
    canaries = {
        p: f"CANARY{i}x{os.urandom(6).hex()}" for i, p in enumerate([*SECRET_FILES, "/etc/app/later.conf"])
    }
    env = Env(tmp_path, lab, fleet_with(example, smtp), smtp)
    try:
        await _canaries_stay_on_the_host(env, lab, host, canaries, caplog)
    finally:
        sh(lab, host, "rm -rf /etc/app /etc/letsencrypt /etc/kubernetes /etc/postfix/sasl_passwd")


async def _canaries_stay_on_the_host(
    env: Env, lab: Lab, host: str, canaries: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    sh(lab, host, "mkdir -p /etc/app && echo 'plain = 1' > /etc/app/later.conf")
    await env.scan(host)
    await env.deliver()
    assert "plain = 1" in git(env.history.path, "show", "main:hosts/db1/etc/app/later.conf")
    for path, text in SECRET_FILES.items():
        res = lab.exec(host, ["sh", "-c", WRITE, "sh", path], input=text.format(c=canaries[path]).encode())
        assert res.returncode == 0, res.stderr
    later = pem("EC PRIVATE KEY", canaries["/etc/app/later.conf"]).encode()  # plain before, secret now
    assert lab.exec(host, ["sh", "-c", WRITE, "sh", "/etc/app/later.conf"], input=later).returncode == 0
    caplog.set_level(logging.DEBUG)
    mails: list[Message] = []
    before = structlog.get_config()  # every level, whatever an earlier test configured
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            r = await env.scan(host)
            mails += await env.deliver()
            sh(lab, host, "echo rotated >> /etc/app/server.pem && echo rotated >> /etc/kubernetes/admin.conf")
            rotated = await env.scan(host)
            mails += await env.deliver()
    finally:
        structlog.configure(**before)
    assert set(SECRET_FILES) <= set(r.new) and r.secret_changed == ("/etc/app/later.conf",)
    assert set(rotated.secret_changed) == {"/etc/app/server.pem", "/etc/kubernetes/admin.conf"}
    assert len(mails) == 2 and logs  # positive evidence: mails arrived, log lines were captured
    meta = json.loads(git(env.history.path, "show", "main:meta/db1.json"))
    assert all(meta[p]["stored"] == "secret" for p in canaries)
    first = body(mails[0]).replace("\r\n", "\n")
    for p in SECRET_FILES:
        assert f"  {p} (secret (content hidden)" in first
    assert "  /etc/app/later.conf (secret (content hidden): now recorded by keyed hash only" in first
    objects = subprocess.run(
        ["git", f"--git-dir={env.history.path}", "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    mail_text = [m.as_bytes() for m in mails] + [body(m).encode() for m in mails]
    log_text = repr(logs) + caplog.text
    for path, canary in canaries.items():
        assert canary.encode() not in objects, path
        assert not any(canary.encode() in t for t in mail_text), path
        assert canary not in log_text, path
    assert "plain = 1" in git(env.history.path, "log", "-p", "--all")  # the old plain content stays
