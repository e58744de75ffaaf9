"""A daemon stopping mid-delivery (SIGTERM while a mail is on the wire) stops promptly: the
outbox's SMTP session is dropped, not ended with a polite QUIT that could wait out the SMTP
timeout (a QUIT sent inside an unfinished DATA phase is read by the server as message text, so
its reply never comes). The message stays queued and is sent on the next delivery. Real aiosmtpd
on loopback; the slow server is the fault."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from test_notify import Sink, free_port, mail

from reconciler.fleet.model import SmtpSettings
from reconciler.notify.outbox import Outbox

SLOW = 20.0  # the server's DATA handler; the SMTP timeout below is longer still


class StallingSink(Sink):
    """Accepts DATA only after a long pause, the first time; then like any server."""

    def __init__(self) -> None:
        super().__init__()
        self.in_data = threading.Event()
        self.stall = True

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.stall:
            self.stall = False
            self.in_data.set()
            await asyncio.sleep(SLOW)
            return "451 too late"
        return await super().handle_DATA(server, session, envelope)


def test_cancelled_delivery_ends_at_once_and_the_mail_stays_queued(tmp_path: Path) -> None:
    now = [time.time()]
    box = Outbox(tmp_path / "outbox.db", clock=lambda: now[0])
    assert box.enqueue("stall:web1:abc", mail("[reconciler] web1 stalled"))
    sink = StallingSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    settings = SmtpSettings(host="127.0.0.1", port=port)

    async def scenario() -> float:
        task = asyncio.create_task(box.deliver_due(settings, timeout=60))
        while not sink.in_data.is_set():  # evidence: the mail is on the wire
            await asyncio.sleep(0.01)
        started = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return time.monotonic() - started

    try:
        took = asyncio.run(scenario())
        assert took < 3.0, f"a cancelled delivery took {took:.1f}s to end (SMTP session not dropped)"
        assert sink.messages == []
        # The message was not lost: once its lease is over, the next delivery sends it.
        now[0] += 3600
        report = asyncio.run(box.deliver_due(settings, timeout=10))
        assert report.sent == 1
        assert [m["Subject"] for m in sink.messages] == ["[reconciler] web1 stalled"]
    finally:
        controller.stop()
