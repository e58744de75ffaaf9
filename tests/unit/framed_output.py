"""Test data for parsers of framed host scripts, written in a readable shorthand: ``@@WORDS``
is a line the script said (``say WORDS``), ``@@LOG`` ... ``@@ENDLOG`` a log tail (section
``log.<n>``), ``@@SIM <rc>`` ... ``@@ENDSIM`` a simulation round (section ``sim.<n>`` with
that exit status); other lines are stray output outside any section."""

from __future__ import annotations

from reconciler.host.script import Section, new_nonce, split_sections


def frame_shorthand(text: str, nonce: str) -> bytes:
    """The shorthand as a framed script would print it with ``nonce``."""
    out: list[str] = []
    counts: dict[str, int] = {}
    open_id: str | None = None
    open_rc = 0

    def start(prefix: str) -> str:
        counts[prefix] = counts.get(prefix, 0) + 1
        sid = f"{prefix}.{counts[prefix]}"
        out.append(f"\n@@{nonce}<{sid}\n")
        return sid

    for line in text.splitlines():
        if open_id is not None and line in ("@@ENDLOG", "@@ENDSIM"):
            out.append(f"\n@@{nonce}>{open_id} {open_rc}\n")
            open_id = None
        elif open_id is not None:
            out.append(line + "\n")
        elif line == "@@LOG":
            open_id, open_rc = start("log"), 0
        elif line.startswith("@@SIM "):
            open_rc = int(line[6:])
            open_id = start("sim")
        elif line.startswith("@@"):
            sid = start("say")
            out.append(f"{line[2:]}\n\n@@{nonce}>{sid} 0\n")
        else:
            out.append(line + "\n")
    return "".join(out).encode()


def sections_of(text: str) -> dict[str, Section]:
    nonce = new_nonce()
    return split_sections(frame_shorthand(text, nonce), nonce=nonce)
