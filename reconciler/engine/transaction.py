"""The file transaction of an apply: stage every new file and link as a dotfile temp next to
its target, validate (``reconciler.engine.validate``), swap (backup as a hard link, chown/chmod
the temp, ``mv -T`` over the target) with the handlers journalled as pending reloads, restore
from the backups when a reload fails. Content only ever reaches a live path by ``rename``; a
change whose directories are not root's alone is refused (``reconciler.host.pathsafe``)."""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable

from reconciler.engine.run import (
    PENDING_RELOADS_PATH,
    ActionOutcome,
    HostRun,
    action_rule,
    new_batch,
    read_back_paths,
    result_text,
    run_helper,
)
from reconciler.engine.validate import CheckFailure, needs_validation, validate_changes, validation_copy
from reconciler.errors import Reason
from reconciler.host.pathsafe import STRICT, Batch, Rule, Status, rule_of
from reconciler.host.script import Result as _Result
from reconciler.kinds.actions import (
    FILE_KINDS,
    ActionKind,
)
from reconciler.kinds.filestate import parse_read_back, read_back
from reconciler.kinds.resources import (
    FileResource,
    LinkResource,
    Service,
)
from reconciler.log import get_logger

log = get_logger(__name__)

# Fault injection for tests only: awaited with the host name right before the swap round trip
# (staging, if any, done in a round trip of its own): a test races the host's other users there
# (links swapped in after the observation). Never set in production code.
FAULT_BEFORE_SWAP: Callable[[str], Awaitable[None]] | None = None


# ---------------------------------------------------------------- files


def _file_actions(run: HostRun) -> list[int]:
    return run.indices(set(FILE_KINDS))


def _content_actions(run: HostRun, idx: list[int]) -> list[int]:
    """Actions that put new content or a new link in place (staged)."""
    out = []
    for i in idx:
        a = run.plan.actions[i]
        if a.kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK):
            out.append(i)
    return out


def _stage_ops(run: HostRun, b: Batch, idx: list[int], staged: list[int]) -> None:
    """Leftovers of earlier applies removed from every directory with a change (never this
    run's); then every new file/link created as a dotfile temp next to its target, owner and
    mode set on the open file."""
    actions = run.plan.actions
    dirs: dict[str, int] = {}
    for i in idx:
        dirs.setdefault(posixpath.dirname(actions[i].path or "/"), i)
    staged_dirs = {posixpath.dirname(actions[i].path or "/") for i in staged}
    for d, i in dirs.items():
        if d not in staged_dirs:  # (staging cleans its own directories)
            b.clean(actions[i].path or "/", action_rule(actions[i]), keep_token=True)
    for i in staged:
        a = actions[i]
        t = a.target
        assert a.path is not None
        if isinstance(t, FileResource):
            copy = validation_copy(a.path, run.token, i) if t.validators and not action_rule(a).strict else ""
            b.stage(
                i,
                a.path,
                action_rule(a),
                content=t.content,
                mode=t.mode,
                owner=t.owner,
                group=t.group,
                validation_copy=copy,
            )
        elif isinstance(t, LinkResource):
            b.stage(i, a.path, action_rule(a), link_target=t.target)


async def files_phase(run: HostRun) -> None:
    _refuse(run)
    idx = _file_actions(run)
    if not idx:
        return
    staged = _content_actions(run, idx)
    # nothing to validate between staging and swapping: both in one round trip (a test hook
    # that must run between them keeps them apart)
    combined = bool(staged) and not needs_validation(run, idx) and FAULT_BEFORE_SWAP is None
    # when the re-observation would only read these files again, the same run reads them
    back = read_back_paths(run) if combined else None
    if staged:
        b = new_batch(run)
        _stage_ops(run, b, idx, staged)
        if combined:
            b.gate()  # a file that could not be staged: nothing swapped in this run
            _swap_ops(run, b, idx)
            if back:
                read_back(b, {p: _path_rule(run, p) for p in back})
        res, answer, marker = await run_helper(run, b)
        done = {s.idx: s.text for s in answer if s.tag == "S"}
        if any(i not in done for i in staged):
            await _unstage(run, staged)
            msg = f"staging failed (exit {res.exit_status}): {result_text(res)[-2000:]}"
            for i in idx:
                run.mark(i, "failed", msg)
            run.messages.append(msg)
            _fail_handlers(run, idx)
            return
        bad = {i: text.removeprefix("fail ") for i, text in done.items() if text.split(" ")[0] != "ok"}
        # the inode of each staged file: the swap refuses anything else found under its name
        run.staged_ids.update({i: text[3:] for i, text in done.items() if text.startswith("ok ")})
        if bad:
            held = _hold_back(run, idx, bad, "could not be staged")
            # a refused directory or an unknown owner found while staging (the plan saw the
            # host before it changed) is a refusal; anything else (a full disk...) may pass
            refusal = all(t.startswith(("refused: ", "unknown user", "unknown group")) for t in bad.values())
            run.fail(Reason.REFUSED if refusal else Reason.APPLY_FAILED, "; ".join(bad.values()))
            await _unstage(run, [i for i in staged if i in held])
            idx = [i for i in idx if i not in held]
            if not idx:
                return
            if combined:  # the gate kept everything back: swap the rest now
                await _swap(run, idx)
                return
        elif combined:
            _swap_outcome(run, idx, res, answer)
            if back:
                run.read_back = parse_read_back(res.stdout, back, marker)
            return
        staged = [i for i in staged if i in idx]
    # validate
    failures = await validate_changes(run, idx)
    if failures:
        blocked = _blocked_by(run, idx, failures)
        await _unstage(run, [i for i in staged if i in blocked])
        _report_blocked(run, idx, failures, blocked)
        idx = [i for i in idx if i not in blocked]
        if not idx:
            return
    await _swap(run, idx)


def _path_rule(run: HostRun, path: str) -> Rule:
    for f in run.desired.files:
        if f.path == path:
            return rule_of(f)
    return STRICT


def _refuse(run: HostRun) -> None:
    """Refused actions (the plan saw a link or another user's directory on the path, or an
    unknown owner) fail with their reason; their handlers' other changes are held back."""
    refused = run.indices({ActionKind.REFUSED})
    if refused:
        why = {i: run.plan.actions[i].reason for i in refused}
        _hold_back(run, [*refused, *_file_actions(run)], why, "refused")
        # the host's own state refuses this commit: retrying repeats it until the fleet or the
        # host changes (a new commit, or an explicit sync after the host is fixed)
        run.fail(Reason.REFUSED, "; ".join(f"{run.plan.actions[i].resource}: {why[i]}" for i in refused))


def _hold_back(run: HostRun, idx: list[int], bad: dict[int, str], what: str) -> set[int]:
    """``bad`` fail with their reason; every other change of their handlers is held back (a
    handler's files are validated and reloaded as a whole; independent changes still apply).
    Returns what was held back (``bad`` included)."""
    actions = run.plan.actions
    handlers = {h for i in bad if (h := actions[i].handler)}
    held: set[int] = set()
    for i in idx:
        a = actions[i]
        if i in bad:
            run.mark(i, "failed", bad[i])
            run.messages.append(f"{a.resource}: {bad[i]}")
        elif a.handler in handlers:
            run.mark(i, "skipped", f"not applied: another change of {a.handler} {what}")
        else:
            continue
        held.add(i)
    run.failed_handlers |= handlers
    _skip_services_of_failed(run)
    return held


def _skip_services_of_failed(run: HostRun) -> None:
    """A service named after a held-back handler would start on the old configuration."""
    for i in run.indices({ActionKind.START_SERVICE}):
        t = run.plan.actions[i].target
        if isinstance(t, Service) and t.name in run.failed_handlers:
            run.mark(i, "skipped", f"not started: the configuration of {t.name} did not apply")
            run.messages.append(f"service {t.name} not started: its configuration did not apply")


def _blocked_by(run: HostRun, idx: list[int], failures: list[CheckFailure]) -> dict[int, str]:
    """The file actions a validation failure holds back, each with the reason: the file that
    failed its own validator, every change of a handler whose validation failed (or that owns
    such a file), and every change of a handler whose validated tree holds a held-back change
    (its validation assumed that change). Independent changes are not held back."""
    actions = run.plan.actions
    if any(f.unknown for f in failures):
        return dict.fromkeys(idx, "validation did not finish")
    bad_files = {f.action for f in failures if f.action is not None}
    bad_handlers = {f.handler for f in failures if f.handler}
    bad_handlers |= {h for i in bad_files if (h := actions[i].handler)}
    while True:
        held = [i for i in idx if i in bad_files or actions[i].handler in bad_handlers]
        paths = [actions[i].path for i in held if actions[i].path]
        more = set()
        for i in idx:
            name = actions[i].handler
            if not name or name in bad_handlers:
                continue
            try:
                roots = [v.tree_root for v in run.desired.handler(name).validators if v.tree_root]
            except KeyError:
                continue
            if any(p and r and (p + "/").startswith(r.rstrip("/") + "/") for p in paths for r in roots):
                more.add(name)
        if not more:
            break
        bad_handlers |= more
    out: dict[int, str] = {}
    for i in idx:
        a = actions[i]
        if i in bad_files:
            out[i] = "its validation failed"
        elif a.handler in bad_handlers:
            out[i] = f"validation of {a.handler} failed"
    return out


def _report_blocked(
    run: HostRun, idx: list[int], failures: list[CheckFailure], blocked: dict[int, str]
) -> None:
    actions = run.plan.actions
    direct = {f.action for f in failures if f.action is not None}
    for i, why in blocked.items():
        run.mark(i, "failed" if i in direct or "did not finish" in why else "skipped", f"not applied: {why}")
        h = actions[i].handler
        if h:
            run.failed_handlers.add(h)
    held = [actions[i].resource for i in idx if i in blocked]
    going = [actions[i].resource for i in idx if i not in blocked]
    msg = "validation failed:\n" + "\n".join(f.message for f in failures)
    msg += f"\nnot applied (live files untouched, not reloaded): {', '.join(held)}"
    if going:
        msg += f"\nindependent changes still applied: {', '.join(going)}"
    run.messages.append(msg)
    # a validator that refused is terminal for this commit; one that did not finish is not
    unknown = any(f.unknown for f in failures)
    run.fail(Reason.APPLY_FAILED if unknown else Reason.VALIDATION_FAILED, msg)
    # services named after a held-back handler would start on the old configuration
    for i in run.indices({ActionKind.START_SERVICE}):
        t = actions[i].target
        if isinstance(t, Service) and t.name in run.failed_handlers:
            run.mark(i, "skipped", f"not started: the configuration of {t.name} did not validate")
            run.messages.append(f"service {t.name} not started: its configuration did not validate")


def _fail_handlers(run: HostRun, idx: list[int]) -> None:
    for i in idx:
        h = run.plan.actions[i].handler
        if h:
            run.failed_handlers.add(h)


async def _unstage(run: HostRun, staged: list[int]) -> None:
    if not staged:
        return
    b = new_batch(run)
    for i in staged:
        a = run.plan.actions[i]
        b.unstage(a.path or "/", action_rule(a))
    await run_helper(run, b)


async def _swap(run: HostRun, idx: list[int]) -> None:
    b = new_batch(run)
    _swap_ops(run, b, idx)
    if FAULT_BEFORE_SWAP is not None:
        await FAULT_BEFORE_SWAP(run.host)
    res, answer, _ = await run_helper(run, b)
    _swap_outcome(run, idx, res, answer)


def _swap_ops(run: HostRun, b: Batch, idx: list[int]) -> None:
    """Put the staged files live (rename inside the pinned directory), with backups of a
    handler's files; mode/owner fixes on the open file; deletes. The pending-reloads journal
    first: if it cannot be written, nothing goes live."""
    actions = run.plan.actions
    reloading = {a.handler for a in actions if a.kind is ActionKind.RELOAD and a.handler}
    touched = {h for i in idx if (h := actions[i].handler) in reloading}
    if touched:
        # written BEFORE anything goes live: if the apply is cut off before the reloads, the
        # next observation finds the handlers here and the next plan reloads them
        run.journal = (run.journal or set()) | touched
        b.journal(PENDING_RELOADS_PATH, "".join(f"{n}\n" for n in sorted(run.journal)))
    for i in idx:
        a = actions[i]
        p = a.path
        assert p is not None
        t = a.target
        rule = action_rule(a)
        # a backup only where a failed reload can roll the file back: a handler's files
        backup = bool(a.handler)
        if a.kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK):
            link = t.target if isinstance(t, LinkResource) else None
            owner = t.owner if isinstance(t, FileResource) else "root"
            b.swap(i, p, rule, backup=backup, link_target=link, owner=owner, expect=run.staged_ids.get(i, ""))
        elif a.kind in (ActionKind.CHMOD, ActionKind.CHOWN) and isinstance(t, FileResource):
            chown = a.kind is ActionKind.CHOWN
            b.meta(i, p, rule, chown=chown, mode=t.mode, owner=t.owner, group=t.group)
        elif a.kind is ActionKind.DELETE:
            b.delete(i, p, rule, backup=backup)
        else:
            run.mark(i, "failed", f"nothing to do for {a.kind}")


def _swap_outcome(run: HostRun, idx: list[int], res: _Result, answer: list[Status]) -> None:
    actions = run.plan.actions
    journal = next((s.text for s in answer if s.tag == "J"), "")
    for s in answer:
        if s.tag == "B":
            run.swapped[s.idx] = True
    for i in idx:
        if i in run.outcomes:
            continue
        ok = next((s for s in answer if s.idx == i and s.tag == "OK"), None)
        fail = next((s for s in answer if s.idx == i and s.tag == "F"), None)
        if ok is not None:
            run.swapped.setdefault(i, False)
            run.mark(i, "done", ok.text)
            continue
        if fail is not None:
            msg = fail.text
        elif journal:
            msg = f"not swapped: {journal}"
        else:
            msg = f"no answer (exit {res.exit_status}): {result_text(res)[-500:]}"
        run.mark(i, "failed", msg)
        run.messages.append(f"{actions[i].resource}: {msg}")
        h = actions[i].handler
        if h:
            run.failed_handlers.add(h)


async def restore_handler(run: HostRun, handler: str) -> str:
    """Put back the files of one handler from this apply's backups (created files removed)."""
    b = new_batch(run)
    for i, had_backup in run.swapped.items():
        a = run.plan.actions[i]
        if a.handler != handler or a.kind in (ActionKind.CHMOD, ActionKind.CHOWN) or not a.path:
            continue
        b.restore(i, a.path, action_rule(a), had_backup=had_backup)
        run.outcomes[i] = ActionOutcome(a, "failed", f"rolled back: {handler} failed to reload")
    res, answer, _ = await run_helper(run, b)
    problems = [s.text for s in answer if s.tag == "RF"]
    if res.exit_status != 0:
        problems.append(f"restore exit {res.exit_status}: {res.stderr.decode(errors='replace')[-500:]}")
    return "; ".join(problems)
