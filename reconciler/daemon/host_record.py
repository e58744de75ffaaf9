"""A host's place in the loop's retry state: failures, the scheduled retry, the commit it is
stalled on (kept in the store: a stall survives a restart) and the commit it converged on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from reconciler.daemon.store import HostState, Store
from reconciler.errors import Reason


@dataclass
class HostRecord:
    failures: int = 0
    failed_commit: str = ""
    retry: asyncio.TimerHandle | None = None
    retry_reasons: set[str] = field(default_factory=set)
    terminal_commit: str = ""
    terminal_reason: Reason | None = None
    converged_commit: str = ""

    @classmethod
    def restored(cls, host: str, store: Store | None) -> HostRecord:
        """A new record; stalled on the commit the store says it is (a terminal reason)."""
        rec = cls()
        if store is not None:
            st = store.host(host)
            code = _reason(st.code)
            if st.state is HostState.STALLED and code is not None and code.terminal:
                rec.terminal_commit, rec.terminal_reason = st.attempted_commit, code
        return rec

    def clear_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self.retry_reasons.clear()

    def clear_stall(self) -> None:
        self.terminal_commit, self.terminal_reason = "", None


def _reason(code: str) -> Reason | None:
    try:
        return Reason(code)
    except ValueError:
        return None
