"""Kinds ``file`` and ``link``: the diff of declared files and symlinks against their observed
state (content by sha256, with a unified diff unless secret; mode; owner; link target; a path
whose directories are not root's alone is refused). Their change is the engine's file
transaction (``reconciler.engine.transaction``); their observation the engine's ONE ``find`` and
``sha256sum`` (``reconciler.engine.observe``)."""

from __future__ import annotations

import difflib
import hashlib

from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.resources import FileResource, LinkResource

SECRET_DIFF = "(secret: content hidden)"  # noqa: S105 (a label, not a secret)


def text_diff(old: bytes | None, new: bytes | None, path: str) -> str:
    """A unified diff of two contents ("" when equal); binary content is not shown."""
    if old == new:
        return ""
    try:
        old_text = (old or b"").decode("utf-8")
        new_text = (new or b"").decode("utf-8")
    except UnicodeDecodeError:
        return "(binary content differs)"
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True),
        new_text.splitlines(keepends=True),
        fromfile=f"{path} (live)" if old is not None else "/dev/null",
        tofile=f"{path} (desired)" if new is not None else "/dev/null",
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def plan_files(files: tuple[FileResource, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for f in files:
        state = observed.files.get(f.path) or FileState(path=f.path, exists=False)
        unknown = []
        if f.owner in observed.unknown_users:
            unknown.append(f"no user {f.owner}")
        if f.group in observed.unknown_groups:
            unknown.append(f"no group {f.group}")
        if unknown and not state.refused:
            why = f"{' and '.join(unknown)} on this host (owner {f.owner}:{f.group}); nothing changed"
            out.append(Action(ActionKind.REFUSED, f"file {f.path}", f.domain, why, "", f.path, f.handler, f))
            continue
        out += plan_file(f, state)
    return out


def refused_reason(state: FileState) -> str:
    """The reason shown for a refused path: what is wrong, and that nothing went through it."""
    return f"refused: {state.refused}; nothing read or changed through it"


def plan_file(f: FileResource, state: FileState) -> list[Action]:
    res = f"file {f.path}"
    if state.refused:
        return [Action(ActionKind.REFUSED, res, f.domain, refused_reason(state), "", f.path, f.handler, f)]
    if not state.exists:
        diff = SECRET_DIFF if f.secret else text_diff(None, f.content, f.path)
        return [Action(ActionKind.CREATE, res, f.domain, "missing", diff, f.path, f.handler, f)]
    if state.kind != "file":
        if state.kind == "dir":
            reason = "a directory is in the way (not replaced automatically)"
            return [Action(ActionKind.UPDATE, res, f.domain, reason, "", f.path, f.handler, f)]
        diff = SECRET_DIFF if f.secret else text_diff(None, f.content, f.path)
        reason = f"is a {state.kind}, should be a regular file"
        return [Action(ActionKind.UPDATE, res, f.domain, reason, diff, f.path, f.handler, f)]
    if state.sha256 != sha256(f.content):
        if f.secret:
            diff = SECRET_DIFF
        elif state.content is not None:
            diff = text_diff(state.content, f.content, f.path)
        else:
            diff = "(content differs; live content not fetched)"
        return [Action(ActionKind.UPDATE, res, f.domain, "content differs", diff, f.path, f.handler, f)]
    out: list[Action] = []
    if state.mode is not None and state.mode != f.mode:
        out.append(
            Action(
                ActionKind.CHMOD,
                res,
                f.domain,
                f"mode {state.mode:04o} should be {f.mode:04o}",
                "",
                f.path,
                f.handler,
                f,
            )
        )
    if (state.owner is not None and state.owner != f.owner) or (
        state.group is not None and state.group != f.group
    ):
        out.append(
            Action(
                ActionKind.CHOWN,
                res,
                f.domain,
                f"owner {state.owner}:{state.group} should be {f.owner}:{f.group}",
                "",
                f.path,
                f.handler,
                f,
            )
        )
    return out


def plan_links(links: tuple[LinkResource, ...], observed: Observed) -> list[Action]:
    out: list[Action] = []
    for lk in links:
        state = observed.files.get(lk.path) or FileState(path=lk.path, exists=False)
        res = f"link {lk.path}"
        if state.refused:
            reason = refused_reason(state)
            out.append(Action(ActionKind.REFUSED, res, lk.domain, reason, "", lk.path, lk.handler, lk))
        elif not state.exists:
            out.append(
                Action(
                    ActionKind.CREATE,
                    res,
                    lk.domain,
                    f"missing (-> {lk.target})",
                    "",
                    lk.path,
                    lk.handler,
                    lk,
                )
            )
        elif state.kind != "link" or state.link_target != lk.target:
            was = f"-> {state.link_target}" if state.kind == "link" else f"a {state.kind}"
            if state.kind == "dir":
                reason = f"a directory is in the way of the link -> {lk.target} (not replaced automatically)"
            else:
                reason = f"is {was}, should be -> {lk.target}"
            out.append(Action(ActionKind.RELINK, res, lk.domain, reason, "", lk.path, lk.handler, lk))
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
