"""The bounds every render runs under, and the error a broken bound raises.

A fleet commit is rendered in a worker process (``reconciler.domains.bounded_render``) with a wall-time
limit, an address-space limit and caps on what it may produce; the Jinja sandbox
(``reconciler.domains.templating``) refuses single expressions that would build huge strings, lists or
integers. A broken bound refuses the whole commit (``RenderLimitExceeded``), unlike an ordinary
template error, which stays the error of the one host that renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.errors import RenderError

MIB = 1 << 20


@dataclass(frozen=True)
class RenderLimits:
    timeout: float = 20.0  # seconds of wall time to render one commit (every host of it)
    memory: int = 512 * MIB  # address space of the render worker (RLIMIT_AS), bytes
    max_file_bytes: int = 1 * MIB  # one rendered file
    max_host_bytes: int = 16 * MIB  # every file of one host together

    def describe(self) -> str:
        return (
            f"time {self.timeout:g}s, memory {format_size(self.memory)}, "
            f"{format_size(self.max_file_bytes)} per file, {format_size(self.max_host_bytes)} per host"
        )


class RenderLimitExceeded(RenderError):
    """A render broke one of its bounds. ``limit`` is a stable word: ``timeout``, ``memory``,
    ``file-size``, ``host-size``, ``sandbox`` or ``worker`` (the worker died)."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"
