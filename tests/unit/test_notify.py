"""Outbox + SMTP against a real aiosmtpd server on loopback."""

from __future__ import annotations

import datetime
import email
import socket
import ssl
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler.fleet.model import SmtpSecurity, SmtpSettings
from reconciler.notify import outbox as notify
from reconciler.notify.outbox import Mail, MailConfigError, Outbox

PASSWORD = "CANARY-smtp-pw-91c2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """Collects every message the SMTP server accepts."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


class SmtpServer:
    """aiosmtpd on 127.0.0.1:port; can be stopped and started again on the same port."""

    def __init__(self, port: int, **smtp_kw: Any) -> None:
        self.port = port
        self.sink = Sink()
        self.kw = smtp_kw
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port, **self.kw)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def mail(subject: str = "[reconciler] web1: 1 changed, 0 new, 0 removed in /etc") -> Mail:
    return Mail(subject=subject, body="diff here\n", to=("ops@example.com",), sender="reconciler@example.com")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def test_outage_then_delivered_exactly_once(tmp_path: Path) -> None:
    port = free_port()
    server = SmtpServer(port)
    clock = Clock()
    box = Outbox(tmp_path / "outbox.db", backoff_base=10, clock=clock)
    settings = SmtpSettings(host="127.0.0.1", port=port)
    assert box.enqueue("drift:web1:abc", mail())
    assert not box.enqueue("drift:web1:abc", mail())  # same drift again: nothing new
    # server down: the mail waits
    rep = await box.deliver_due(settings, timeout=2)
    assert rep.sent == 0 and rep.failed == 1 and rep.error
    assert box.counts().pending == 1 and box.counts().failed_attempts == 1
    server.start()
    try:
        # backoff: not due yet
        assert (await box.deliver_due(settings)).sent == 0
        clock.t += 11
        # a restart (new Outbox object on the same file) loses nothing
        box2 = Outbox(tmp_path / "outbox.db", backoff_base=10, clock=clock)
        rep = await box2.deliver_due(settings)
        assert rep.sent == 1
        clock.t += 10_000
        assert (await box2.deliver_due(settings)).sent == 0
        assert not box2.enqueue("drift:web1:abc", mail())
    finally:
        server.stop()
    assert len(server.sink.messages) == 1
    m = server.sink.messages[0]
    assert m["Subject"] == "[reconciler] web1: 1 changed, 0 new, 0 removed in /etc"
    assert m["Message-ID"].endswith("@reconciler>")
    assert server.sink.envelopes[0] == ("reconciler@example.com", ["ops@example.com"])
    c = box2.counts()
    assert (c.pending, c.sent, c.failed_attempts) == (0, 1, 1)


async def test_dedupe_keys_recorded_with_the_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    assert box.known(["d1", "d2"]) == set()
    box.enqueue("denials:web1:x", mail(), dedupe=["d1", "d2"])
    assert box.known(["d1", "d2", "d3", "denials:web1:x"]) == {"d1", "d2", "denials:web1:x"}
    assert (tmp_path / "outbox.db").stat().st_mode & 0o077 == 0


def make_tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_pem, key_pem)
    client_ctx = ssl.create_default_context(cafile=str(cert_pem))
    return server_ctx, client_ctx


async def test_starttls_with_auth_from_env_and_password_never_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_ctx, client_ctx = make_tls(tmp_path)
    seen: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            seen.append((data.login.decode(), data.password.decode()))
            return AuthResult(success=data.password.decode() == PASSWORD, handled=False)
        return AuthResult(success=False, handled=False)

    port = free_port()
    server = SmtpServer(
        port, tls_context=server_ctx, require_starttls=True, authenticator=authenticator, auth_required=True
    )
    server.start()
    notify.set_tls_context(client_ctx)
    try:
        settings = SmtpSettings(
            host="127.0.0.1",
            port=port,
            security=SmtpSecurity.STARTTLS,
            username_env="TEST_SMTP_USER",
            password_env="TEST_SMTP_PASSWORD",
        )
        box = Outbox(tmp_path / "outbox.db", backoff_base=0)
        box.enqueue("k1", mail())
        monkeypatch.delenv("TEST_SMTP_PASSWORD", raising=False)
        monkeypatch.setenv("TEST_SMTP_USER", "ops")
        with pytest.raises(MailConfigError, match="TEST_SMTP_PASSWORD"):
            notify.smtp_credentials(settings)
        # wrong password: refused, retried later, password not in any log line
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong-" + PASSWORD)
        with structlog.testing.capture_logs() as logs:
            rep = await box.deliver_due(settings)
        assert rep.sent == 0 and rep.error and PASSWORD not in rep.error
        assert PASSWORD not in repr(logs)
        monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
        with structlog.testing.capture_logs() as logs:
            rep = await box.deliver_due(settings)
        assert rep.sent == 1, rep
        assert PASSWORD not in repr(logs)
        assert seen[-1] == ("ops", PASSWORD)
        assert len(server.sink.messages) == 1
    finally:
        notify.set_tls_context(None)
        server.stop()


async def test_credentials_never_sent_in_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = SmtpServer(port)
    server.start()
    try:
        monkeypatch.setenv("TEST_SMTP_PASSWORD", PASSWORD)
        settings = SmtpSettings(host="127.0.0.1", port=port, password_env="TEST_SMTP_PASSWORD")
        box = Outbox(tmp_path / "outbox.db")
        box.enqueue("k1", mail())
        rep = await box.deliver_due(settings)
        assert rep.sent == 0 and rep.error and "without TLS" in rep.error
        assert box.counts().pending == 1
    finally:
        server.stop()
