"""THE way to run a script on a host: the script builder and the one output framing.

Builder: a ``ScriptBuilder`` collects data values as arguments and hands back a reference
(``"${7}"``) to put into the script text, so the script is our own code plus numeric
references: a value is never spliced into the text, whatever bytes it holds (NUL excepted:
refused). Fixed scripts take their data as positional arguments the same way.

Framing: every script starts with ``prelude()``, which reads a nonce (128 random bits, new
for every run, ``new_nonce()``) from the first line of stdin (never argv: other users of the
host read argv in /proc) and defines ``frame ID COMMAND...``, which runs COMMAND as section
ID, and ``say WORDS...``, which reports one line of the script's own (an event, a verdict) as
section ``say.<n>`` (``said()`` lists them in order). Output on stdout, raw bytes::

    \n@@<nonce><<id>\n<the command's stdout>\n@@<nonce>><id> <exit status>\n

On stderr each section's messages follow a ``@@<nonce><<id>`` line. ``split_sections`` is
the one parser; a file name, a log line or a package's output cannot forge a marker (it
would need the nonce). ``run_framed`` runs a framed script and splits its output.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
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


def result_text(res: Result) -> str:
    """A command's stderr then stdout, as text (what a report shows of a failure)."""
    return (res.stderr + res.stdout).decode(errors="replace").strip()


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


# ---------------------------------------------------------------- the one framing

_FIXED_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; export PATH\n"
_FRAME = r"""LC_ALL=C; export LC_ALL
@PATH@IFS= read -r N || N=
@STDIN@case $N in ''|*[!0-9a-f]*) echo 'reconciler: no framing nonce on stdin' >&2; exit 97;; esac
frame() {
  _fid=$1; shift
  printf '\n@@%s<%s\n' "$N" "$_fid"
  printf '@@%s<%s\n' "$N" "$_fid" >&2
  "$@"
  printf '\n@@%s>%s %s\n' "$N" "$_fid" "$?"
}
_said=0
say() { _said=$((_said + 1)); frame "say.$_said" printf '%s\n' "$*"; }
"""
NO_NONCE_EXIT = 97  # the script found no nonce on stdin (or sh itself could not start: 127)


def prelude(*, keep_stdin: bool = False, fixed_path: bool = True) -> str:
    """The start of every host script: C locale, a fixed PATH, the nonce read from stdin and
    ``frame``. stdin is closed after the nonce unless the script reads data from it; the
    drift scripts keep the login PATH (as they always did: tests put fault-injection shims on
    it)."""
    text = _FRAME.replace("@PATH@", _FIXED_PATH if fixed_path else "")
    return text.replace("@STDIN@", "" if keep_stdin else "exec </dev/null\n")


def new_nonce() -> str:
    """The framing nonce for one run (sent as the first line of the script's stdin)."""
    return secrets.token_hex(16)


def framed_stdin(nonce: str, after: bytes = b"") -> bytes:
    return f"{nonce}\n".encode() + after


@dataclass(frozen=True)
class Section:
    id: str
    body: bytes
    exit_status: int | None  # None: the section never ended (script killed)
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def text(self) -> str:
        """The body as text (UTF-8, bad bytes replaced), without its last newline."""
        t = self.body.decode("utf-8", errors="replace")
        return t[:-1] if t.endswith("\n") else t


Sections = Mapping[str, Section]


def split_sections(stdout: bytes, stderr: bytes = b"", *, nonce: str) -> dict[str, Section]:
    """Split framed output into sections (raw bodies); see the module doc."""
    mark = b"\n@@" + nonce.encode("ascii")
    errs = _split_stderr(stderr, nonce)
    out: dict[str, Section] = {}
    current: str | None = None
    body = b""
    for chunk in stdout.split(mark)[1:]:
        head, _, rest = chunk.partition(b"\n")
        if head.startswith(b"<"):
            if current is not None:
                out[current] = Section(current, body, None, errs.get(current, ""))
            current, body = head[1:].decode("utf-8", errors="replace"), rest
        elif head.startswith(b">") and current is not None:
            sid, _, status = head[1:].decode("utf-8", errors="replace").rpartition(" ")
            rc = int(status) if sid == current and status.lstrip("-").isdigit() else None
            out[current] = Section(current, body, rc, errs.get(current, ""))
            current, body = None, b""
    if current is not None:
        out[current] = Section(current, body, None, errs.get(current, ""))
    return out


def numbered(sections: Sections, prefix: str) -> list[str]:
    """The texts of sections ``<prefix>.1``, ``<prefix>.2``... in order."""
    n = len(prefix) + 1
    keys = [k for k in sections if k.startswith(prefix + ".") and k[n:].isdigit()]
    return [sections[k].text for k in sorted(keys, key=lambda k: int(k[n:]))]


def said(sections: Sections) -> list[str]:
    """The lines the script reported with ``say``, in order."""
    return numbered(sections, "say")


def _split_stderr(stderr: bytes, nonce: str) -> dict[str, str]:
    mark = f"@@{nonce}<"
    out: dict[str, list[str]] = {}
    current = ""
    for line in stderr.decode("utf-8", errors="replace").splitlines():
        if line.startswith(mark):
            current = line[len(mark) :].strip()
            continue
        out.setdefault(current, []).append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


@dataclass(frozen=True)
class Framed:
    """One framed run: the raw result, its sections, and whether the script started at all."""

    result: Result
    sections: dict[str, Section]
    nonce: str

    @property
    def started(self) -> bool:
        """False when sh or the prelude failed before any frame (exit 97/127, no marker)."""
        return not (
            self.result.exit_status in (NO_NONCE_EXIT, 127)
            and f"@@{self.nonce}".encode() not in self.result.stdout
        )

    def stderr_text(self) -> str:
        """All of stderr, without the framing's marker lines."""
        return "\n".join(v for v in _split_stderr(self.result.stderr, self.nonce).values() if v)


async def run_framed(
    conn: Runner,
    script: str,
    args: Sequence[str] = (),
    *,
    timeout: float | None = None,
    stdin_after: bytes = b"",
) -> Framed:
    """Run a script that starts with ``prelude()`` and split its framed output."""
    nonce = new_nonce()
    res = await conn.run_script(
        script, args=args, stdin_after=framed_stdin(nonce, stdin_after), timeout=timeout
    )
    return Framed(res, split_sections(res.stdout, res.stderr, nonce=nonce), nonce)
