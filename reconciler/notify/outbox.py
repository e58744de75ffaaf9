"""Durable mail outbox (SQLite) and SMTP delivery. The only module that knows SMTP.

Every message has an idempotency key with a UNIQUE constraint: enqueueing the same key twice
(a repeated scan, a restart) is a no-op, so the same drift is mailed once. Delivery is
at-least-once: a message stays ``pending`` until the server accepted it, with exponential
backoff between attempts; an SMTP outage loses nothing. A delivery lease stops two processes
from sending the same message at the same time. The ``Message-ID`` is derived from the key, so a
receiver can drop the rare duplicate (a crash between "server accepted" and "marked sent").

``dedupe`` keys ride along with a message in the same transaction: callers use them to remember
"this denial / this event was already mailed" exactly when the mail is queued.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import aiosmtplib

from reconciler.errors import Terminal
from reconciler.fleet.model import MailSettings, SmtpSecurity, SmtpSettings
from reconciler.log import get_logger

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,           -- JSON list
    subject TEXT NOT NULL,
    message BLOB NOT NULL,              -- the exact RFC 5322 bytes sent on every attempt
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    last_error TEXT,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt);
CREATE TABLE IF NOT EXISTS dedupe (
    key TEXT PRIMARY KEY,
    message_key TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class MailConfigError(Terminal):
    """The fleet's SMTP settings cannot be used (e.g. a credential variable is not set)."""


@dataclass(frozen=True)
class Mail:
    subject: str
    body: str
    to: tuple[str, ...]
    sender: str


@dataclass(frozen=True)
class OutboxCounts:
    pending: int
    sent: int
    failed_attempts: int  # attempts that did not deliver, over all messages


@dataclass(frozen=True)
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    error: str | None = None  # the last delivery error (never contains a credential)


def build_message(mail: Mail, key: str, *, now: float | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = mail.sender
    msg["To"] = ", ".join(mail.to)
    msg["Subject"] = mail.subject
    msg["Date"] = formatdate(now if now is not None else time.time(), localtime=False)
    msg["Message-ID"] = f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@reconciler>"
    msg["X-Reconciler-Key"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(mail.body)
    return msg.as_bytes()


class Outbox:
    """The durable outbox in ``<state_dir>/outbox.db``."""

    def __init__(
        self,
        path: Path | str,
        *,
        backoff_base: float = 30.0,
        backoff_max: float = 3600.0,
        lease_seconds: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._owner = uuid.uuid4().hex
        fresh = not self.path.exists()
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)
        if fresh:
            os.chmod(self.path, 0o600)

    @classmethod
    def in_state_dir(cls, state_dir: Path | str, **kw: object) -> Outbox:
        return cls(Path(state_dir) / "outbox.db", **kw)  # type: ignore[arg-type]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    # -- enqueue

    def enqueue(self, key: str, mail: Mail, *, dedupe: Iterable[str] = ()) -> bool:
        """Queue ``mail`` under ``key``; False (and nothing queued) if the key is known.
        The ``dedupe`` keys are recorded in the same transaction."""
        if not mail.to:
            raise MailConfigError("a mail needs at least one recipient")
        now = self._clock()
        data = build_message(mail, key, now=now)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox"
                    " (key, created, sender, recipients, subject, message, next_attempt)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, now, mail.sender, json.dumps(list(mail.to)), mail.subject, data, now),
                )
                new = cur.rowcount == 1
                db.executemany(
                    "INSERT OR IGNORE INTO dedupe (key, message_key, created) VALUES (?, ?, ?)",
                    [(d, key, now) for d in dedupe],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if new:
            log.info("mail queued", key=key, subject=mail.subject)
        return new

    def known(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` are already message keys or dedupe keys."""
        found: set[str] = set()
        with closing(self._connect()) as db:
            for k in dict.fromkeys(keys):
                row = db.execute(
                    "SELECT 1 FROM dedupe WHERE key = ? UNION ALL SELECT 1 FROM outbox WHERE key = ?", (k, k)
                ).fetchone()
                if row is not None:
                    found.add(k)
        return found

    # -- metrics and inspection

    def counts(self) -> OutboxCounts:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT COALESCE(SUM(status='pending'),0), COALESCE(SUM(status='sent'),0),"
                " COALESCE(SUM(attempts - (status='sent')),0) FROM outbox"
            ).fetchone()
        return OutboxCounts(pending=int(row[0]), sent=int(row[1]), failed_attempts=int(row[2]))

    def messages(self, status: str | None = None) -> list[tuple[str, str, str]]:
        """(key, status, subject) of every message, oldest first."""
        q = "SELECT key, status, subject FROM outbox"
        args: tuple[str, ...] = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        with closing(self._connect()) as db:
            return [(str(a), str(b), str(c)) for a, b, c in db.execute(q + " ORDER BY id", args)]

    # -- delivery

    def _claim(self, limit: int) -> list[tuple[int, str, str, list[str], bytes, int]]:
        now = self._clock()
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "SELECT id, key, sender, recipients, message, attempts FROM outbox"
                    " WHERE status='pending' AND next_attempt <= ? AND lease_until <= ? ORDER BY id LIMIT ?",
                    (now, now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE outbox SET lease_until=?, lease_owner=? WHERE id=?",
                    [(now + self.lease_seconds, self._owner, r[0]) for r in rows],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [
            (int(r[0]), str(r[1]), str(r[2]), list(json.loads(r[3])), bytes(r[4]), int(r[5])) for r in rows
        ]

    def _mark_sent(self, msg_id: int) -> None:
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE outbox SET status='sent', sent_at=?, attempts=attempts+1, lease_until=0,"
                " last_error=NULL WHERE id=? AND lease_owner=?",
                (self._clock(), msg_id, self._owner),
            )

    def _mark_failed(self, msg_id: int, attempts: int, error: str) -> None:
        delay = min(self.backoff_max, self.backoff_base * (2 ** min(attempts, 30)))
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE outbox SET attempts=attempts+1, next_attempt=?, lease_until=0, last_error=?"
                " WHERE id=? AND lease_owner=?",
                (self._clock() + delay, error[:500], msg_id, self._owner),
            )

    async def deliver_due(
        self, smtp: SmtpSettings, *, limit: int = 100, timeout: float = 30
    ) -> DeliveryReport:
        """Send every due message over one SMTP session. Failures are rescheduled with
        exponential backoff; nothing is ever dropped."""
        batch = self._claim(limit)
        if not batch:
            return DeliveryReport()
        sent = failed = 0
        last_error: str | None = None
        client: aiosmtplib.SMTP | None = None
        try:
            client = await _open_smtp(smtp, timeout)
        except (aiosmtplib.SMTPException, OSError, MailConfigError) as err:
            last_error = _describe(err)
            for msg_id, _key, *_rest, attempts in batch:
                self._mark_failed(msg_id, attempts, last_error)
            log.warning("smtp unavailable; mail stays queued", error=last_error, queued=len(batch))
            return DeliveryReport(sent=0, failed=len(batch), error=last_error)
        try:
            for i, (msg_id, key, sender, rcpts, data, attempts) in enumerate(batch):
                try:
                    await client.sendmail(sender, rcpts, data)
                except (aiosmtplib.SMTPException, OSError) as err:
                    last_error = _describe(err)
                    failed += 1
                    self._mark_failed(msg_id, attempts, last_error)
                    log.warning("mail not delivered; will retry", key=key, error=last_error)
                    if isinstance(err, aiosmtplib.SMTPServerDisconnected | OSError):
                        # the session is gone: reschedule the rest without trying them
                        for m_id, _k, _s, _r, _d, att in batch[i + 1 :]:
                            self._mark_failed(m_id, att, last_error)
                            failed += 1
                        break
                else:
                    sent += 1
                    self._mark_sent(msg_id)
                    log.info("mail sent", key=key)
        except BaseException:
            # Cancelled (the daemon is stopping) or crashed mid-session: drop the connection. A
            # QUIT sent inside an unfinished DATA phase is read as message text and its reply
            # never comes, so a polite end would wait out the SMTP timeout. A message whose
            # sending was cut stays leased, then queued: sent again later, never lost.
            client.close()
            raise
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()
        except BaseException:
            client.close()
            raise
        return DeliveryReport(sent=sent, failed=failed, error=last_error)


def smtp_credentials(smtp: SmtpSettings) -> tuple[str | None, str | None]:
    """Read the credentials from the environment variables the fleet names."""
    user = pw = None
    if smtp.username_env:
        user = os.environ.get(smtp.username_env)
        if user is None:
            raise MailConfigError(f"SMTP username variable {smtp.username_env} is not set")
    if smtp.password_env:
        pw = os.environ.get(smtp.password_env)
        if pw is None:
            raise MailConfigError(f"SMTP password variable {smtp.password_env} is not set")
    return user, pw


_TLS_CONTEXT: ssl.SSLContext | None = None


def set_tls_context(ctx: ssl.SSLContext | None) -> None:
    """Trust anchors for SMTP over TLS (tests use a throwaway CA); None = system defaults."""
    global _TLS_CONTEXT
    _TLS_CONTEXT = ctx


async def _open_smtp(smtp: SmtpSettings, timeout: float) -> aiosmtplib.SMTP:
    user, pw = smtp_credentials(smtp)
    client = aiosmtplib.SMTP(
        hostname=smtp.host,
        port=smtp.port,
        timeout=timeout,
        use_tls=smtp.security is SmtpSecurity.TLS,
        start_tls=True if smtp.security is SmtpSecurity.STARTTLS else False,
        tls_context=_TLS_CONTEXT or ssl.create_default_context(),
    )
    await client.connect()
    try:
        if user is not None or pw is not None:
            if smtp.security is SmtpSecurity.NONE:
                raise MailConfigError("refusing to send SMTP credentials without TLS (smtp.security: none)")
            await client.login(user or "", pw or "")
    except BaseException:
        client.close()
        raise
    return client


def _describe(err: BaseException) -> str:
    # aiosmtplib messages carry server replies, never our password; keep them short anyway
    text = str(err).replace("\n", " ")[:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def mail_for(settings: MailSettings, subject: str, body: str) -> Mail:
    return Mail(subject=subject, body=body, to=tuple(settings.to), sender=settings.sender)


def recipients(settings: MailSettings | None) -> Sequence[str]:
    return () if settings is None else settings.to
