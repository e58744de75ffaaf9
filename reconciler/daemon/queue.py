"""The loop's two building blocks: a deduplicating keyed queue (one entry and one follow-up per
key, whatever the event rate) and the retry backoff (exponential, capped, jittered)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field


class KeyedQueue:
    """A FIFO of keys where each key is queued at most once and processed at most once at a time.

    ``put`` on a key that is queued merges the reasons; on a key in flight it records one
    follow-up (merged too), queued again when ``done`` is called.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pending: dict[str, set[str]] = {}
        self._in_flight: dict[str, set[str]] = {}
        self._follow_up: dict[str, set[str]] = {}
        self._wakeup = asyncio.Event()
        self._closed = False

    def put(self, key: str, reasons: Iterable[str]) -> bool:
        """Queue ``key``; False when it merged into an existing entry (or the queue is closed)."""
        if self._closed:
            return False
        if key in self._in_flight:
            self._follow_up.setdefault(key, set()).update(reasons)
            return False
        if key in self._pending:
            self._pending[key].update(reasons)
            return False
        self._pending[key] = set(reasons)
        self._wakeup.set()
        return True

    async def get(self) -> tuple[str, frozenset[str]] | None:
        """The next key and its merged reasons; None once the queue is closed."""
        while True:
            if self._closed:
                return None
            if self._pending:
                key = next(iter(self._pending))
                reasons = self._pending.pop(key)
                self._in_flight[key] = reasons
                return key, frozenset(reasons)
            self._wakeup.clear()
            await self._wakeup.wait()

    def done(self, key: str, *, follow_up: bool = True) -> None:
        self._in_flight.pop(key, None)
        extra = self._follow_up.pop(key, None)
        if extra is not None and follow_up and not self._closed:
            self._pending[key] = extra
            self._wakeup.set()

    def discard(self, key: str) -> None:
        self._pending.pop(key, None)
        self._follow_up.pop(key, None)

    def close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._follow_up.clear()
        self._wakeup.set()

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._follow_up)

    @property
    def in_flight(self) -> tuple[str, ...]:
        return tuple(self._in_flight)

    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)


@dataclass(frozen=True)
class Backoff:
    base: float = 2.0
    maximum: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, failures: int) -> float:
        """Exponential, capped, with "equal jitter": a uniform draw in [d/2, d]."""
        d = min(self.maximum, self.base * (2 ** max(0, failures - 1)))
        return self.rng.uniform(d / 2, d)
