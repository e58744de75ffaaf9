"""The outbox's delivery lease (notify/outbox.py): two PROCESSES delivering from one outbox at
the same time (a daemon and a CLI drift run, or a restarted daemon next to its old self) never
send one message twice, against a real aiosmtpd that is slow enough for them to overlap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from test_notify import Sink, free_port, mail

from reconciler.notify.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]
N = 16

DELIVER = """
import asyncio, sys
from reconciler.fleet.model import SmtpSettings
from reconciler.notify.outbox import Outbox

async def main() -> int:
    box = Outbox(sys.argv[1])
    settings = SmtpSettings(host="127.0.0.1", port=int(sys.argv[2]))
    sent = 0
    for _ in range(int(sys.argv[3])):  # bounded: a broken lease must not resend forever
        rep = await box.deliver_due(settings, limit=1, timeout=10)
        if not rep.sent and not rep.failed:
            break
        sent += rep.sent
    return sent

print(asyncio.run(main()))
"""


class SlowSink(Sink):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        await asyncio.sleep(0.1)  # both processes are mid-delivery at once
        return await super().handle_DATA(server, session, envelope)


def test_two_processes_never_send_one_message_twice(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    box = Outbox(db)
    for i in range(N):
        assert box.enqueue(f"drift:web1:{i}", mail(f"[reconciler] web1: change {i}"))
    port = free_port()
    sink = SlowSink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", DELIVER, str(db), str(port), str(2 * N)],
                stdout=subprocess.PIPE,
                env=env,
            )
            for _ in range(2)
        ]
        counts = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]  # logs, then the count
    finally:
        controller.stop()
    subjects = [m["Subject"] for m in sink.messages]
    assert sorted(subjects) == sorted(f"[reconciler] web1: change {i}" for i in range(N))  # each once
    assert sum(counts) == N and min(counts) > 0, counts  # both really delivered, side by side
    assert box.counts().pending == 0 and box.counts().sent == N
