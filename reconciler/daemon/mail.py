"""Mail to the admins: where it goes (the daemon config's SMTP settings first, then the fleet's
``notifications.mail``), queued in the durable outbox under an idempotency key, delivered by one
worker task (woken on a new mail, else every ``OUTBOX_INTERVAL`` seconds)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from reconciler.daemon.config import Config, SourceConfig
from reconciler.daemon.source_types import Rejection, Rollback
from reconciler.daemon.step import HostFailure
from reconciler.fleet.model import Fleet, SmtpSecurity, SmtpSettings
from reconciler.gitrepo import redact_url
from reconciler.log import get_logger
from reconciler.notify.outbox import Mail, Outbox

log = get_logger(__name__)

OUTBOX_INTERVAL = 5.0
SMTP_USER_VAR = "RECONCILER_SMTP_USERNAME"
SMTP_PASSWORD_VAR = "RECONCILER_SMTP_PASSWORD"  # noqa: S105 (a variable name, not a value)


class AdminMail:
    def __init__(self, config: Config, outbox: Outbox | None, fleet: Callable[[], Fleet | None]) -> None:
        self.config = config
        self.outbox = outbox
        self._fleet = fleet
        self.wakeup = asyncio.Event()

    def settings(self) -> tuple[SmtpSettings, tuple[str, ...], str] | None:
        """(fleet-model SmtpSettings, recipients, sender), config first, then the fleet's."""
        cfg = self.config.smtp
        fleet_mail = None
        fleet = self._fleet()
        if fleet is not None and getattr(fleet, "notifications", None) is not None:
            fleet_mail = fleet.notifications.mail
        to = cfg.to or (tuple(fleet_mail.to) if fleet_mail is not None else ())
        if not to:
            return None
        if cfg.host:
            smtp = SmtpSettings(
                host=cfg.host,
                port=cfg.port,
                security=SmtpSecurity(cfg.security.value),
                username_env=SMTP_USER_VAR if cfg.username else None,
                password_env=SMTP_PASSWORD_VAR if cfg.password else None,
            )
            sender = cfg.sender
        elif fleet_mail is not None:
            smtp, sender = fleet_mail.smtp, fleet_mail.sender
        else:
            return None
        return smtp, tuple(to), sender

    def publish_credentials(self) -> None:
        # notify reads credentials from named environment variables; the config may have read
        # them from a file. Child processes never see them: gitrepo.isolated_env drops RECONCILER_*.
        if self.config.smtp.username:
            os.environ[SMTP_USER_VAR] = self.config.smtp.username
        if self.config.smtp.password:
            os.environ[SMTP_PASSWORD_VAR] = self.config.smtp.password.reveal()

    def send(self, key: str, subject: str, body: str) -> bool:
        """Queue one mail to the admins under an idempotency key; False if known or no mail."""
        settings = self.settings()
        if settings is None or self.outbox is None:
            log.warning("no mail recipients configured; not mailed", key=key)
            return False
        _, to, sender = settings
        new = self.outbox.enqueue(key, Mail(subject=subject, body=body, to=to, sender=sender))
        if new:
            self.wakeup.set()
        return bool(new)

    async def worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.wakeup.wait(), OUTBOX_INTERVAL)
            except TimeoutError:
                pass
            self.wakeup.clear()
            settings = self.settings()
            if settings is None or self.outbox is None:
                continue
            try:
                await self.outbox.deliver_due(settings[0], timeout=self.config.smtp.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # delivery problems never stop the daemon
                log.warning("mail delivery failed", error=type(exc).__name__)

    def counts(self) -> list[tuple[tuple[str, ...], float]]:
        if self.outbox is None:
            return []
        try:
            c = self.outbox.counts()
        except Exception:
            return []
        return [(("pending",), float(c.pending)), (("sent",), float(c.sent))]


# ---------------------------------------------------------------- the mails (subject, body)


def rejected(source: SourceConfig, rejection: Rejection, good: str) -> tuple[str, str]:
    subject = f"[reconciler] commit {rejection.commit[:12]} refused: {rejection.kind}"
    body = (
        f"The fleet repo {redact_url(source.url)} (branch {source.branch}) has\n"
        f"head {rejection.commit}, which will not be applied:\n\n  {rejection.reason}\n\n"
        f"Hosts stay on the last good commit: {good or '(none yet)'}.\n"
        "Push a fixed (and, if verification is on, properly signed) commit to resume.\n"
    )
    return subject, body


def rolled_back(source: SourceConfig, done: Rollback, requested_by: str, at: float) -> tuple[str, str]:
    url = redact_url(source.url)
    body = (
        f"The applied commit of {url} (branch {source.branch}) was moved back on request:\n\n"
        f"  from {done.previous or '(none)'}\n  to   {done.commit}\n  by   {requested_by}\n"
        f"  at   {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))}\n\n"
        f"The branch head is {done.head}. Hosts converge to {done.commit[:12]} now.\n"
    )
    return f"[reconciler] rolled back to {done.commit[:12]}", body


def stalled(source: SourceConfig, hf: HostFailure) -> tuple[str, str]:
    reason = hf.failure.reason
    subject = f"[reconciler] {hf.host} stalled on commit {hf.commit[:12]}: {reason}"
    body = (
        f"Host {hf.host} did not converge on commit {hf.commit} of {redact_url(source.url)}\n"
        f"(branch {source.branch}), and retrying the same commit cannot help:\n\n"
        f"  reason: {reason}\n\n{_indent(hf.failure.message)}\n\n"
        f"Nothing more is tried on {hf.host} for this commit. Push a fixed commit (or, once the\n"
        f"cause is fixed outside the repo, run `reconciler sync --host {hf.host}`) to resume.\n"
    )
    return subject, body


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.splitlines())
