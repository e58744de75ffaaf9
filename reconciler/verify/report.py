"""Rendering a ``VerifyReport``: a table per host (host-level checks first, then one block
per peer) with pass/fail/skip and the evidence or cause, and a summary; or JSON."""

from __future__ import annotations

import json
import textwrap

from reconciler.verify.checks import Check, Status, VerifyReport

_COLORS = {Status.PASS: "\x1b[32m", Status.FAIL: "\x1b[31;1m", Status.SKIP: "\x1b[33m"}
_RESET = "\x1b[0m"
WIDTH = 110


def _status(s: Status, color: bool) -> str:
    text = f"{s.value.upper():<4}"
    return f"{_COLORS[s]}{text}{_RESET}" if color else text


def _row(c: Check, name_w: int, color: bool, verbose: bool) -> list[str]:
    text = c.cause if c.status is not Status.PASS else c.evidence
    if c.status is Status.FAIL and c.evidence and verbose:
        text += f" [seen: {c.evidence}]"
    lead = f"    {c.name:<{name_w}}  {_status(c.status, color)}  "
    indent = " " * (4 + name_w + 2 + 4 + 2)
    body = textwrap.wrap(text or "-", width=max(40, WIDTH - len(indent))) or ["-"]
    return [lead + body[0]] + [indent + line for line in body[1:]]


def render_text(report: VerifyReport, *, color: bool = False, verbose: bool = False) -> str:
    lines: list[str] = []
    failed_pairs = report.failed_pairs()
    for host in report.hosts:
        checks = report.for_host(host)
        bad = sum(1 for c in checks if c.status is Status.FAIL)
        lines.append(f"{host}: {'ok' if not bad else f'{bad} failed'}")
        name_w = max((len(c.name) for c in checks), default=10)
        own = [c for c in checks if not c.peer]
        if own:
            lines.append("  host")
            for c in own:
                lines += _row(c, name_w, color, verbose)
        for peer in sorted({c.peer for c in checks if c.peer}):
            state = "FAILED" if (host, peer) in failed_pairs else "ok"
            lines.append(f"  -> {peer} ({state})")
            for c in (c for c in checks if c.peer == peer):
                lines += _row(c, name_w, color, verbose)
        lines.append("")
    counts = report.counts()
    pairs_bad = len([p for p in report.pairs if p in failed_pairs])
    lines.append(
        f"{len(report.pairs) - pairs_bad}/{len(report.pairs)} pairs ok; "
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
        f"({report.seconds:.1f} s)"
    )
    skipped = sorted({c.cause for c in report.checks if c.status is Status.SKIP})
    if skipped:
        lines.append("skipped (this machine cannot run them):")
        lines += [f"  - {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def to_json(report: VerifyReport) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n"
