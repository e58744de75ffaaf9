"""The words of drift: the history commit message (with its ``Drift:`` trailer, so a mail can be
rebuilt from git alone), the drift mail and the AppArmor denial mail. Pure: no git, no SSH."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from reconciler.drift import audit
from reconciler.drift.history import SECRET_NOTE, ChangeSet, commit_subject
from reconciler.drift.snapshot import display_path
from reconciler.fleet.model import DriftMode

SUBJECT_PREFIX = "[reconciler] "
MAX_NOTES = 50  # warnings listed in one commit message (a hashing time-out can leave thousands)


def commit_message(
    changes: ChangeSet,
    roots: Sequence[str],
    managed: Mapping[str, str | None],
    *,
    mode: DriftMode,
    fleet_commit: str | None,
    baseline: bool,
    entries: int,
    render_error: str | None = None,
    content_secrets: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> tuple[str, tuple[str, ...]]:
    """(message, drift paths). The message names every path (display form: one line, bytes
    that are not UTF-8 escaped) with what happened; never content. ``content_secrets``: paths
    found secret by their content; ``notes``: the snapshot's warnings (already display text)."""
    host = changes.host
    where = ", ".join(roots)
    drift: list[str] = []
    if baseline:
        lines = [f"{host}: initial snapshot of {where} ({entries} paths)", ""]
    else:
        in_line = frozenset(
            p for p in (c.path for c in changes.changes) if p in managed and managed[p] is None
        )
        lines = [commit_subject(changes, roots, in_line), ""]
        details: dict[str, list[str]] = {}
        for c in changes.changes:
            details.setdefault(c.path, []).append(
                c.detail or (SECRET_NOTE if c.what == "secret-changed" else "")
            )
        for p, what in (content_secrets or {}).items():
            if p in details:
                details[p].append(f"its content holds {_SECRET_KINDS.get(what, 'a secret')}")
        for p in dict.fromkeys(c.path for c in changes.changes):
            if p in managed and managed[p] is None:
                continue  # back in line with the fleet (e.g. applied or enforced): not drift
            drift.append(p)

        def section(title: str, paths: Sequence[str]) -> None:
            if paths:
                lines.append(title)
                for p in paths:
                    extra = "; ".join(d for d in details.get(p, []) if d)
                    lines.append(f"  {display_path(p)}" + (f" ({extra})" if extra else ""))

        section("Changed:", [p for p in changes.changed if p not in in_line])
        section(f"New files in {where} on {host} (not from the fleet repo: check them in or remove them):",
                [p for p in changes.new if p not in in_line])  # fmt: skip
        section("Removed:", [p for p in changes.removed if p not in in_line])
        differing = [p for p in dict.fromkeys(c.path for c in changes.changes) if managed.get(p)]
        if differing:
            lines.append(f"Managed by the fleet and now different from it (drift mode {mode.value}):")
            lines += [f"  {display_path(p)}: {managed[p]}" for p in differing]
        back = [p for p in dict.fromkeys(c.path for c in changes.changes) if p in in_line]
        if back:
            lines.append("Now as the fleet wants them (not drift):")
            lines += [f"  {display_path(p)}" for p in back]
        if notes:
            lines.append("Not recorded normally this scan (the rest was):")
            lines += [f"  {n}" for n in notes[:MAX_NOTES]]
            if len(notes) > MAX_NOTES:
                lines.append(f"  ... and {len(notes) - MAX_NOTES} more (see the scan's warnings)")
        if render_error:
            lines.append(
                f"Fleet could not be rendered for this host ({render_error}); every change counts as drift."
            )
    lines += [
        "",
        f"Reconciler-Host: {host}",
        f"Fleet-Commit: {fleet_commit or 'unknown'}",
        f"Drift: {'yes' if drift else 'no'}",
    ]
    return "\n".join(lines) + "\n", tuple(drift)


_SECRET_KINDS = {
    "private key": "a private key",
    "password hash": "a password hash",
    "secret marker": "a secret marker of the fleet's drift.secret_content",
    "secret content": "a private key, a password hash or a secret marker",
}


def trailer(message: str, name: str) -> str | None:
    for line in reversed(message.splitlines()):
        if line.startswith(name + ": "):
            return line[len(name) + 2 :].strip()
    return None


def drift_mail_body(message: str, commit: str, diff: str, enforcement: str | None, repo: Path) -> str:
    body_lines = message.splitlines()[2:]  # drop the subject line and the blank line
    body = "\n".join(ln for ln in body_lines if not ln.startswith(("Reconciler-Host:", "Drift:"))).rstrip()
    parts = [body, ""]
    if enforcement:
        parts.append(f"Enforcement: {enforcement}")
    parts += [
        f"History commit: {commit} in {repo}",
        "",
        "Diff (secret files are never shown; they are recorded by keyed hash only):",
        diff.rstrip() or "(no content changes: metadata only)",
        "",
    ]
    return "\n".join(parts)


def denial_mail(
    host: str, suggestions: Sequence[audit.Suggestion], denials: Sequence[audit.Denial]
) -> tuple[str, str]:
    subject = f"{SUBJECT_PREFIX}{host}: {len(denials)} new AppArmor denial(s)"
    lines = [f"New AppArmor denials on {host}. Rules that would allow them (review before adding):", ""]
    for s in suggestions:
        lines.append(s.text())
        lines.append("")
    lines.append("Then validate with `apparmor_parser -Q -K` and reload the profile; in a fleet repo, put")
    lines.append("the rules in the profile's `rules:` so the reconciler writes the local override.")
    lines += ["", "Denials:"]
    lines += [f"  {d.line}" for d in denials]
    return subject, "\n".join(lines) + "\n"
