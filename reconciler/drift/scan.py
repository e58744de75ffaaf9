"""One drift scan: snapshot -> classify -> commit -> (enforce) -> enqueue mail; denials -> mail.

Order and recovery (each step is safe to repeat; a crash at any point loses and duplicates
nothing):

1. snapshot the host (manifest + changed files) and prepare the new history state;
2. classify against the fleet (``render_host``): a managed file that differs from the fleet is
   drift; a managed file back in line with the fleet is not; everything unmanaged is drift;
3. commit to the history repo: skipped when HEAD already holds exactly this tree (a scan
   restarted after its commit makes no second commit). The commit message carries the
   classification and a ``Drift: yes|no`` trailer, so a mail can be rebuilt from git alone;
4. enforce (level-triggered, every scan): managed drift in mode ``enforce`` goes to the
   injected ``enforce(host, paths)`` callback (the engine); without one, report only;
5. mail: every commit of the host after the ref ``refs/mailed/<host>`` that says ``Drift: yes``
   is enqueued under the key ``drift:<host>:<commit>`` (UNIQUE in the outbox), then the ref
   moves. A crash between 3 and 5 is repaired by the next scan; between enqueue and send the
   outbox delivers; a repeated enqueue is a no-op;
6. AppArmor denials since the host's kernel log cursor: new ones (by denial key, recorded in
   the outbox in the same transaction as their mail) are mailed with suggested rules, then
   the cursor moves.
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.drift import audit
from reconciler.drift.history import (
    SECRET_NOTE,
    ChangeSet,
    CommitInfo,
    HistoryConflict,
    HistoryRepo,
    Recall,
    commit_subject,
)
from reconciler.drift.secretscan import ContentRules
from reconciler.drift.snapshot import Entry, PathPolicy, Snapshot, display_path, take_snapshot
from reconciler.engine.identity import IDENTITY_PATH, identity_in_line
from reconciler.errors import ReconcilerError
from reconciler.fleet.model import DriftMode, Fleet
from reconciler.host.script import Runner
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger
from reconciler.notify.outbox import Mail, Outbox

log = get_logger(__name__)

EnforceCallback = Callable[[str, Sequence[str]], Awaitable[object]]
SUBJECT_PREFIX = "[reconciler] "
UNAVAILABLE = "enforcement unavailable (no engine in this process): reported only"
MAX_NOTES = 50  # warnings listed in one commit message (a hashing time-out can leave thousands)


@dataclass(frozen=True)
class ManagedDrift:
    path: str
    reason: str  # never content


@dataclass(frozen=True)
class HostDrift:
    host: str
    ok: bool = True
    error: str | None = None
    commit: str | None = None
    baseline: bool = False
    changed: tuple[str, ...] = ()
    new: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    secret_changed: tuple[str, ...] = ()
    drift: tuple[str, ...] = ()  # paths of this commit that are drift
    managed_drift: tuple[ManagedDrift, ...] = ()  # level: managed files differing right now
    enforcement: str = ""
    mails_queued: int = 0
    suggestions: tuple[audit.Suggestion, ...] = ()
    entries: int = 0
    fetched: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """For JSON output and status: paths in their display form (``bad\\xffname.conf``)."""

        def shown(paths: Sequence[str]) -> list[str]:
            return [display_path(p) for p in paths]

        return {
            "host": self.host,
            "ok": self.ok,
            "error": self.error,
            "commit": self.commit,
            "baseline": self.baseline,
            "changed": shown(self.changed),
            "new": shown(self.new),
            "removed": shown(self.removed),
            "secret_changed": shown(self.secret_changed),
            "drift": shown(self.drift),
            "managed_drift": [{"path": display_path(m.path), "reason": m.reason} for m in self.managed_drift],
            "enforcement": self.enforcement,
            "mails_queued": self.mails_queued,
            "apparmor_suggestions": [
                {"profile": s.profile, "local_file": s.local_file, "rules": list(s.rules)}
                for s in self.suggestions
            ],
            "entries": self.entries,
            "fetched": self.fetched,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------- classification (pure)


def under_roots(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def classify_managed(desired: Desired | None, snap: Snapshot, policy: PathPolicy) -> dict[str, str | None]:
    """managed path -> None (matches the fleet) or the reason it differs. Only paths under the
    recorded roots; secrets compare by hash in memory only."""
    out: dict[str, str | None] = {}
    if desired is None:
        return out
    for f in desired.files:
        if not under_roots(f.path, policy.roots) or policy.excluded(f.path):
            continue
        e = snap.entries.get(f.path)
        out[f.path] = _file_reason(e, f.content, f.mode, f.owner, f.group)
    # what the engine writes besides files and links: the firewall's persistent rules (their
    # content is the ruleset) and the key pairs made on the host (any content: never copied off)
    fw = desired.firewall
    persistent = [] if fw is None else [(fw.persistent_path, fw.rules_v4)]
    if fw is not None and fw.rules_v6 is not None:
        persistent.append((fw.persistent_path_v6, fw.rules_v6))
    for path, rules in persistent:
        if under_roots(path, policy.roots) and not policy.excluded(path):
            e = snap.entries.get(path)
            out[path] = (
                "missing"
                if e is None
                else None
                if e.kind == "file" and e.sha256 == hashlib.sha256(rules.encode()).hexdigest()
                else "differs from the fleet's firewall"
            )
    for kp in desired.keypairs:
        for path in (kp.private_path, kp.public_path):
            if under_roots(path, policy.roots) and not policy.excluded(path):
                e = snap.entries.get(path)
                out[path] = (
                    None
                    if e is not None and e.kind == "file"
                    else "missing (the key pair is made on the host)"
                )
    for lk in desired.links:
        if not under_roots(lk.path, policy.roots) or policy.excluded(lk.path):
            continue
        e = snap.entries.get(lk.path)
        if e is None:
            out[lk.path] = "missing (the fleet wants a symlink)"
        elif e.kind != "link":
            out[lk.path] = f"is a {e.kind}, the fleet wants a symlink"
        elif e.target != lk.target:
            out[lk.path] = f"points to {e.target}, the fleet says {lk.target}"
        else:
            out[lk.path] = None
    # the directories the engine made for them (e.g. /etc/reconciler, a drop-in directory)
    for path in [*out, *(posixpath.join(d, ".") for d in desired.owned_dirs), IDENTITY_PATH]:
        parent = posixpath.dirname(path)
        while parent not in out and under_roots(parent, policy.roots) and parent not in policy.roots:
            e = snap.entries.get(parent)
            if e is None or e.kind != "dir":
                break
            out[parent] = None
            parent = posixpath.dirname(parent)
    return out


def _file_reason(e: Entry | None, content: bytes, mode: int, owner: str, group: str) -> str | None:
    if e is None:
        return "missing"
    if e.kind != "file":
        return f"is a {e.kind}, the fleet wants a file"
    reasons = []
    if e.sha256 != hashlib.sha256(content).hexdigest():
        reasons.append("content differs from the fleet")
    if e.mode != mode:
        reasons.append(f"mode {e.mode:04o} (fleet {mode:04o})")
    if e.owner != owner or e.group != group:
        reasons.append(f"owner {e.owner}:{e.group} (fleet {owner}:{group})")
    return "; ".join(reasons) or None


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


# ---------------------------------------------------------------- the scanner


class DriftScanner:
    def __init__(
        self,
        fleet: Fleet,
        history: HistoryRepo,
        outbox: Outbox | None,
        state_dir: Path | str,
        *,
        fleet_commit: str | None = None,
        enforce: EnforceCallback | None = None,
        render: Callable[[Fleet, Any], Desired] | None = None,
        read_denials: bool = True,
    ) -> None:
        self.fleet = fleet
        self.history = history
        self.outbox = outbox
        self.state_dir = Path(state_dir)
        self.fleet_commit = fleet_commit
        self.enforce = enforce
        self._render = render
        self.read_denials = read_denials
        self.cursors = audit.CursorStore(self.state_dir)
        # fault injection for crash-recovery tests: called with a step name
        self.crash_hook: Callable[[str], None] | None = None

    def _crash_point(self, name: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(name)

    def policy_for(self, desired: Desired | None) -> PathPolicy:
        d = self.fleet.drift
        secret_exact = {mf.path for mf in self.fleet.files.values() if mf.secret}
        if desired is not None:
            secret_exact |= {f.path for f in desired.files if f.secret}
        return PathPolicy(
            roots=tuple(d.paths),
            exclude=tuple(d.exclude),
            secret_globs=tuple(d.secret_paths),
            secret_exact=frozenset(secret_exact),
            content=ContentRules(tuple(d.secret_content)),
            max_file_bytes=d.max_file_bytes,
        )

    def _desired(self, host_name: str) -> tuple[Desired | None, str | None]:
        try:
            host = self.fleet.host(host_name)
        except KeyError:
            return None, f"{host_name} is not in the fleet"
        try:
            if self._render is not None:
                return self._render(self.fleet, host), None
            from reconciler.domains.render import render_host

            return render_host(self.fleet, host), None
        except ReconcilerError as err:
            return None, str(err)

    async def scan_host(self, conn: Runner) -> HostDrift:
        started = time.monotonic()
        host = conn.host
        desired, render_error = self._desired(host)
        policy = self.policy_for(desired)
        for attempt in range(3):
            try:
                return await self._scan(conn, host, desired, render_error, policy, started)
            except HistoryConflict:
                if attempt == 2:
                    raise
                log.info("history moved under this scan; scanning again", host=host)
        raise AssertionError("unreachable")

    async def _scan(
        self,
        conn: Runner,
        host: str,
        desired: Desired | None,
        render_error: str | None,
        policy: PathPolicy,
        started: float,
    ) -> HostDrift:
        prev = await self.history.recorded(host)

        recall = Recall(self.history, prev)
        snap = await take_snapshot(
            conn, policy, recall.sha256, recorded_large=recall.large, secret_unchanged=recall.secret_unchanged
        )
        if snap.warnings:
            notes = list(snap.warnings)[:20]
            log.warning("drift scan: some files not recorded normally", host=host, notes=notes)
        prep = await self.history.prepare(snap, prev)
        managed = classify_managed(desired, snap, policy)
        ident = snap.entries.get(IDENTITY_PATH)  # written by apply: not drift when it is ours
        if ident is not None and identity_in_line(self.fleet, host, ident.kind, ident.sha256):
            managed[IDENTITY_PATH] = None
        baseline = not prev
        mode = self.fleet.drift.mode
        message, drift_paths = commit_message(
            prep.changes,
            policy.roots,
            managed,
            mode=mode,
            fleet_commit=self.fleet_commit,
            baseline=baseline,
            entries=len(snap.entries),
            render_error=render_error,
            content_secrets=snap.content_secrets,
            notes=snap.warnings,
        )
        info: CommitInfo | None = await self.history.commit(prep, message)
        self._crash_point("after-commit")

        # enforcement is level-triggered: whatever managed file differs now
        differing = tuple(ManagedDrift(p, r) for p, r in sorted(managed.items()) if r)
        enforcement = ""
        if differing:
            enforcement = await self._enforce(host, [m.path for m in differing], mode)

        queued = await self._mail_commits(host, info, enforcement)
        warnings = list(snap.warnings)
        suggestions: tuple[audit.Suggestion, ...] = ()
        if self.read_denials:
            try:
                suggestions, n = await self._denials(conn, host)
                queued += n
            except (ReconcilerError, OSError) as err:
                warnings.append(f"kernel log not read: {err}")
        ch = prep.changes if info is not None else ChangeSet(host)
        return HostDrift(
            host=host,
            commit=info.sha if info else None,
            baseline=baseline and info is not None,
            changed=ch.changed if not baseline else (),
            new=ch.new if not baseline else (),
            removed=ch.removed if not baseline else (),
            secret_changed=ch.secret_changed if not baseline else (),
            drift=drift_paths if info is not None else (),
            managed_drift=differing,
            enforcement=enforcement,
            mails_queued=queued,
            suggestions=suggestions,
            entries=len(snap.entries),
            fetched=snap.fetched,
            seconds=time.monotonic() - started,
            warnings=tuple(warnings) + ((f"fleet render failed: {render_error}",) if render_error else ()),
        )

    async def _enforce(self, host: str, paths: Sequence[str], mode: DriftMode) -> str:
        if mode is not DriftMode.ENFORCE:
            return "drift mode report: not put back"
        if self.enforce is None:
            return UNAVAILABLE
        try:
            outcome = await self.enforce(host, paths)
        except Exception as err:  # the engine's failure is reported, never fatal to the scan
            log.warning("enforcement failed", host=host, error=str(err)[:300])
            return f"enforcement failed: {str(err)[:300]}"
        return outcome if isinstance(outcome, str) and outcome else "put back by the engine"

    async def _mail_commits(self, host: str, info: CommitInfo | None, enforcement: str) -> int:
        mail = self.fleet.notifications.mail
        cursor = await self.history.get_ref(f"refs/mailed/{host}")
        commits = await self.history.host_commits(host, cursor)
        if not commits:
            return 0
        queued = 0
        if mail is not None and self.outbox is not None:
            for sha in commits:
                msg = await self.history.message(sha)
                if trailer(msg, "Drift") != "yes":
                    continue
                diff = await self.history.diff(sha, host)
                enf = enforcement if info is not None and sha == info.sha else None
                if enf is None and trailer(msg, "Drift") == "yes" and "Managed by the fleet" in msg:
                    enf = "see the next scan (this mail was rebuilt after an interruption)"
                body = drift_mail_body(msg, sha, diff, enf, self.history.path)
                subject = SUBJECT_PREFIX + msg.splitlines()[0]
                if self.outbox.enqueue(
                    f"drift:{host}:{sha}",
                    Mail(subject=subject, body=body, to=tuple(mail.to), sender=mail.sender),
                ):
                    queued += 1
                self._crash_point("after-enqueue")
        await self.history.set_ref(f"refs/mailed/{host}", commits[-1], cursor)
        return queued

    async def _denials(self, conn: Runner, host: str) -> tuple[tuple[audit.Suggestion, ...], int]:
        cursor = self.cursors.load(host)
        read = await audit.read_kernel_log(conn, cursor)
        denials = audit.parse_lines(read.lines)
        queued = 0
        suggestions: list[audit.Suggestion] = []
        if denials:
            known = self.outbox.known(d.key for d in denials) if self.outbox is not None else set()
            new = [d for d in denials if d.key not in known]
            if new:
                kinds = await audit.path_kinds(conn, [d.name for d in new if d.name])
                profile_files = {p.name: p.name for p in self.fleet.apparmor.values()}
                suggestions = audit.suggest(new, kinds, profile_files)
                mail = self.fleet.notifications.mail
                if mail is not None and self.outbox is not None:
                    subject, body = denial_mail(host, suggestions, new)
                    keys = sorted(d.key for d in new)
                    key = f"denials:{host}:" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
                    if self.outbox.enqueue(
                        key,
                        Mail(subject=subject, body=body, to=tuple(mail.to), sender=mail.sender),
                        dedupe=keys,
                    ):
                        queued += 1
        self.cursors.save(host, read.cursor)
        return tuple(suggestions), queued

    async def scan(self, pool: Any, hosts: Sequence[str]) -> list[HostDrift]:
        """Scan ``hosts`` concurrently; one failed host never stops the others."""

        async def one(name: str) -> HostDrift:
            started = time.monotonic()
            try:
                conn = await pool.get(name)
                return await self.scan_host(conn)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("drift scan failed", host=name, error=str(err)[:500])
                return HostDrift(host=name, ok=False, error=str(err) or type(err).__name__,
                                 seconds=time.monotonic() - started)  # fmt: skip

        return list(await asyncio.gather(*(one(h) for h in hosts)))


def make_daemon_step(
    history: HistoryRepo,
    outbox: Outbox | None,
    state_dir: Path | str,
    *,
    enforce: Callable[[Any, Any], EnforceCallback] | None = None,
    render: Callable[[Fleet, Any], Desired] | None = None,
) -> Callable[[str, Any, Any], Awaitable[DriftFinding]]:
    """An adapter for ``reconciler.daemon.daemon.Daemon(drift=...)``: ``(host, target, pool) ->
    DriftFinding`` (the hand-edited paths). ``enforce(target, pool)`` may build the engine's
    callback; ``render`` gives a host's Desired (the daemon's: its render worker's results, never
    rendered here)."""

    async def step(host: str, target: Any, pool: Any) -> DriftFinding:
        scanner = DriftScanner(
            target.fleet,
            history,
            outbox,
            state_dir,
            fleet_commit=target.commit,
            enforce=enforce(target, pool) if enforce is not None else None,
            render=render,
        )
        conn = await pool.get(host)
        res = await scanner.scan_host(conn)
        # drift is what changed by hand since the last snapshot: a managed file that differs
        # only because the fleet moved on (a new commit not applied yet) is the fleet's change,
        # and what the reconciler itself applied is "now as the fleet wants it" (not drift)
        return DriftFinding(len(res.drift), res.commit or "", tuple(display_path(p) for p in res.drift[:20]))

    return step


@dataclass(frozen=True)
class DriftFinding:
    """What one daemon scan found: hand-edited paths (never the reconciler's own changes)."""

    count: int
    history_commit: str = ""  # the /etc history commit that recorded them ("" = none made)
    paths: tuple[str, ...] = ()  # the first few, display form


def engine_enforcer(fleet: Fleet, pool: Any) -> EnforceCallback:
    """Put managed files back with the engine: a full reconcile (plan + apply) of the host."""

    async def enforce(host: str, paths: Sequence[str]) -> object:
        from reconciler.engine.fleet import reconcile_fleet

        res = await reconcile_fleet(fleet, [host], pool, apply=True)
        for out in res.hosts:
            if out.error:
                raise ReconcilerError(out.error)
        return res

    return enforce


def engine_follows(target: Any, pool: Any) -> EnforceCallback:
    """For the daemon, whose engine step reconciles the host right after the scan: nothing to
    do here, and the alert says who puts the files back."""

    async def enforce(host: str, paths: Sequence[str]) -> str:
        return "the engine's reconcile that follows this scan puts it back"

    return enforce


@dataclass(frozen=True)
class ScanSummary:
    hosts: tuple[HostDrift, ...]
    delivered: int = 0
    delivery_error: str | None = None
    pending: int = 0
    extra: dict[str, object] = field(default_factory=dict)
