"""Human and JSON rendering of plans and apply results (no I/O: returns strings)."""

from __future__ import annotations

import json
import os
import re
from typing import TextIO

from reconciler.engine.fleet import APPLIED, CHANGES, ERROR, FAILED, IN_SYNC, FleetResult, HostOutcome
from reconciler.kinds.actions import ActionKind, HostPlan, bucket, summary_counts, summary_line

RESET = "\x1b[0m"
BOLD = "\x1b[1m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
CYAN = "\x1b[36m"
DIM = "\x1b[2m"

SYMBOL = {"add": "+", "change": "~", "destroy": "-", "reload": "↻"}
COLOR = {"add": GREEN, "change": YELLOW, "destroy": RED, "reload": CYAN}


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if "NO_COLOR" in os.environ:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Paint:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, *codes: str) -> str:
        if not self.color or not codes:
            return text
        return "".join(codes) + text + RESET


_HUNK_HEADER = re.compile(r"@{2} ")  # a unified diff's "@@ -1,3 +1,4 @@" (not a host marker)


def render_diff(diff: str, paint: _Paint, indent: str = "      ") -> list[str]:
    out: list[str] = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            out.append(indent + paint(line, BOLD))
        elif _HUNK_HEADER.match(line):
            out.append(indent + paint(line, CYAN))
        elif line.startswith("+"):
            out.append(indent + paint(line, GREEN))
        elif line.startswith("-"):
            out.append(indent + paint(line, RED))
        else:
            out.append(indent + line)
    return out


def render_host_plan(plan: HostPlan, paint: _Paint) -> list[str]:
    lines: list[str] = []
    for a in plan.actions:
        b = bucket(a.kind)
        sym, color = (SYMBOL[b], COLOR[b]) if a.kind is not ActionKind.REFUSED else ("!", RED)
        reason = paint("(" + a.reason + ")", DIM)
        lines.append(f"  {paint(sym, color, BOLD)} {paint(str(a.kind), color)} {a.resource}  {reason}")
        if a.diff:
            lines += render_diff(a.diff, paint)
    for p in plan.pending:
        lines.append(f"  {paint('…', YELLOW)} pending {p.subject}: {p.reason}")
    for p in plan.skipped:
        lines.append(f"  {paint('!', YELLOW)} skip {p.subject}: {p.reason}")
    for w in plan.warnings:
        lines.append(f"  {paint('warning:', YELLOW)} {w}")
    for e in plan.errors:
        lines.append(f"  {paint('error:', RED)} {e}")
    return lines


def host_header(o: HostOutcome, paint: _Paint) -> str:
    name = paint(o.host, BOLD)
    if o.status == ERROR and o.plan is None:
        return f"{name}: {paint('ERROR', RED, BOLD)} {o.error}"
    if o.plan is None:
        return f"{name}: {o.status}"
    c = o.plan.counts()
    if o.status == IN_SYNC:
        return f"{name}: {paint('in sync', GREEN)} — {o.plan.noop_reason}"
    counts = f"{c['add']} to add, {c['change']} to change, {c['destroy']} to destroy, {c['reload']} reload"
    label = {
        CHANGES: paint("changes", YELLOW),
        APPLIED: paint("applied", GREEN),
        FAILED: paint("FAILED", RED, BOLD),
        ERROR: paint("ERROR", RED, BOLD),
    }.get(o.status, o.status)
    return f"{name}: {label} ({counts})"


def render_plan(result: FleetResult, *, color: bool = False) -> str:
    paint = _Paint(color)
    lines: list[str] = []
    for o in result.hosts:
        lines.append(host_header(o, paint))
        if o.plan is not None and o.status != IN_SYNC:
            lines += render_host_plan(o.plan, paint)
        elif o.plan is not None:
            lines += [f"  {paint('…', YELLOW)} pending {p.subject}: {p.reason}" for p in o.plan.pending]
            lines += [f"  {paint('!', YELLOW)} skip {p.subject}: {p.reason}" for p in o.plan.skipped]
            lines += [f"  {paint('warning:', YELLOW)} {w}" for w in o.plan.warnings]
        if o.status == ERROR and o.plan is not None and o.error:
            lines.append(f"  {paint('error:', RED)} {o.error}")
    lines.append("")
    lines.append(paint(summary_line(result.plans()), BOLD) + _errors_suffix(result))
    return "\n".join(lines) + "\n"


def _errors_suffix(result: FleetResult) -> str:
    n = sum(1 for o in result.hosts if o.status in (ERROR, FAILED))
    return f"; {n} host{'s' if n != 1 else ''} with errors" if n else ""


def render_apply(result: FleetResult, *, color: bool = False) -> str:
    paint = _Paint(color)
    lines: list[str] = []
    applied = failed = in_sync = errors = partial = 0
    partial_done = partial_total = 0
    for o in result.hosts:
        if o.status == IN_SYNC:
            in_sync += 1
            lines.append(f"{paint(o.host, BOLD)}: {paint('in sync', GREEN)}, nothing to do")
            continue
        if o.status == ERROR:
            errors += 1
            lines.append(f"{paint(o.host, BOLD)}: {paint('ERROR', RED, BOLD)} {o.error}")
            continue
        r = o.result
        if r is None:
            lines.append(host_header(o, paint))
            continue
        if o.status == APPLIED:
            applied += 1
            verdict = paint("applied", GREEN) + (", verified in sync" if r.converged else "")
        elif o.partial:
            partial += 1
            done, total = r.change_counts()
            partial_done, partial_total = partial_done + done, partial_total + total
            verdict = paint("PARTLY APPLIED", YELLOW, BOLD) + f" ({done} of {total} changes)"
        else:
            failed += 1
            verdict = paint("FAILED", RED, BOLD) + (" (firewall rolled back)" if r.rolled_back else "")
        reloads = f", reloaded {', '.join(r.reloaded)}" if r.reloaded else ""
        lines.append(f"{paint(o.host, BOLD)}: {verdict}: {r.changed()} changes{reloads} in {r.seconds:.1f} s")
        for oc in r.outcomes:
            if oc.status == "done" and oc.action.kind is not ActionKind.RELOAD:
                lines.append(f"  {paint('✓', GREEN)} {oc.action.kind} {oc.action.resource}")
            elif oc.status == "failed":
                lines.append(f"  {paint('✗', RED)} {oc.action.kind} {oc.action.resource}: {oc.message}")
            elif oc.status in ("skipped", "n/a"):
                lines.append(f"  {paint('-', YELLOW)} {oc.action.kind} {oc.action.resource}: {oc.message}")
        for m in r.messages:
            for i, ml in enumerate(m.splitlines()):
                lines.append(("  " if i == 0 else "    ") + ml)
    lines.append("")
    part = f"{partial} partly applied ({partial_done} of {partial_total} changes), " if partial else ""
    lines.append(
        paint(
            f"Apply: {applied} applied, {part}{failed} failed, {in_sync} in sync, "
            f"{errors} unreachable or in error",
            BOLD,
        )
    )
    return "\n".join(lines) + "\n"


def to_json(result: FleetResult, *, mode: str) -> str:
    counts = summary_counts(result.plans())
    doc = {"mode": mode, "summary": counts, **result.as_dict()}
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def progress_line(o: HostOutcome, done: int, total: int) -> str:
    status = o.status if not o.error else f"{o.status}: {o.error.splitlines()[0][:120]}"
    return f"[{done}/{total}] {o.host}: {status}"
