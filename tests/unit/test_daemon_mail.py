"""The admins' mails of the daemon (reconciler/daemon/mail.py): what they say, and that a URL's
credentials never reach a mail."""

from __future__ import annotations

from reconciler.daemon import mail
from reconciler.daemon.config import SourceConfig
from reconciler.daemon.source_types import Rejection, Rollback
from reconciler.daemon.step import HostFailure
from reconciler.errors import Failure, Reason

SOURCE = SourceConfig(url="https://deploy:t0ken-canary@git.example.org/fleet.git", branch="prod")


def test_refused_commit_mail() -> None:
    rej = Rejection("a" * 40, "unsigned", "commit aaaaaaaaaaaa is not signed")
    subject, body = mail.rejected(SOURCE, rej, "b" * 40)
    assert subject == "[reconciler] commit aaaaaaaaaaaa refused: unsigned"
    assert "is not signed" in body and "b" * 40 in body and "branch prod" in body
    assert "t0ken-canary" not in body and "https://***@git.example.org/fleet.git" in body


def test_stall_and_rollback_mails() -> None:
    hf = HostFailure("web1", "c" * 40, Failure(Reason.FIREWALL_ROLLED_BACK, "rolled back\nline two"), None, 1)
    subject, body = mail.stalled(SOURCE, hf)
    assert subject == f"[reconciler] web1 stalled on commit {'c' * 12}: firewall-rolled-back"
    assert "  rolled back\n  line two" in body and "reconciler sync --host web1" in body
    subject, body = mail.rolled_back(SOURCE, Rollback("d" * 40, "e" * 40, "f" * 40), "alice", 0.0)
    assert subject == f"[reconciler] rolled back to {'d' * 12}"
    assert "by   alice" in body and "1970-01-01 00:00:00 UTC" in body
    assert "t0ken-canary" not in body + subject
