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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.drift import audit
from reconciler.drift.history import (
    ChangeSet,
    CommitInfo,
    HistoryConflict,
    HistoryRepo,
    Recall,
)
from reconciler.drift.messages import SUBJECT_PREFIX, commit_message, denial_mail, drift_mail_body, trailer
from reconciler.drift.secretscan import ContentRules
from reconciler.drift.snapshot import Entry, PathPolicy, Snapshot, display_path, take_snapshot
from reconciler.engine.identity import IDENTITY_PATH, identity_in_line
from reconciler.errors import ReconcilerError
from reconciler.fleet.model import DriftMode, Fleet, Host
from reconciler.host.script import Pool, Runner
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger
from reconciler.notify.outbox import Mail, Outbox

log = get_logger(__name__)

EnforceCallback = Callable[[str, Sequence[str]], Awaitable[object]]
UNAVAILABLE = "enforcement unavailable (no engine in this process): reported only"


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
    # paths the fleet removes (a retired IPsec stack's configuration, Debian's global
    # deflate.conf and default site when sites own their defaults): gone is in line
    for gone in desired.absent:
        if under_roots(gone.path, policy.roots) and not policy.excluded(gone.path):
            e = snap.entries.get(gone.path)
            out[gone.path] = None if e is None else f"exists ({gone.reason}: the fleet removes it)"
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
        render: Callable[[Fleet, Host], Desired] | None = None,
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

    async def scan(self, pool: Pool, hosts: Sequence[str]) -> list[HostDrift]:
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


@dataclass(frozen=True)
class DriftFinding:
    """What one daemon scan found: hand-edited paths (never the reconciler's own changes)."""

    count: int
    history_commit: str = ""  # the /etc history commit that recorded them ("" = none made)
    paths: tuple[str, ...] = ()  # the first few, display form
