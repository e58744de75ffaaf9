"""Build POSIX sh scripts whose user data travels only as positional arguments.

A ``ScriptBuilder`` collects data values as arguments and hands back a reference (``"${7}"``)
to put into the script text, so the script is our own code plus numeric references: a value
is never spliced into the text, whatever bytes it holds (NUL excepted: refused).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.:@%+=,/-]+$")


@dataclass
class ScriptBuilder:
    lines: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    def ref(self, value: str) -> str:
        """A quoted reference to ``value`` passed as the next positional argument."""
        if "\0" in value:
            raise ValueError("a NUL byte cannot travel as an argument")
        self.args.append(value)
        return f'"${{{len(self.args)}}}"'

    def refs(self, values: list[str] | tuple[str, ...]) -> str:
        return " ".join(self.ref(v) for v in values)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def script(self, prelude: str = "") -> str:
        return prelude + "\n".join(self.lines) + "\n"


def token(value: str) -> str:
    """A literal we put into script text ourselves (section ids, flags): checked to be inert."""
    if not _SAFE_TOKEN.match(value):
        raise ValueError(f"not a safe script token: {value!r}")
    return value


# ---------------------------------------------------------------- what callers need of a host
# The structural types of reconciler.host.connection's Connection and ConnectionPool, so modules
# that run commands on hosts (apply, deadman, packaging, snapshot) need not import asyncssh.


class Result(Protocol):
    @property
    def exit_status(self) -> int: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...


class Runner(Protocol):
    """Runs commands and our own scripts on one host (``reconciler.host.connection.Connection``)."""

    host: str

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> Result: ...

    async def run_script(
        self,
        script: str,
        *,
        args: Sequence[str] = (),
        stdin_after: bytes | None = None,
        timeout: float | None = None,
    ) -> Result: ...


class Conn(Runner, Protocol):
    async def close(self) -> None: ...


class Pool(Protocol):
    """Cached and fresh connections by host name (``reconciler.host.connection.ConnectionPool``)."""

    async def get(self, host: str) -> Conn: ...
    async def fresh(self, host: str) -> Conn: ...
