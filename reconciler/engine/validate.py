"""Validation of staged changes before the swap: each file's own validators on its staged copy,
each handler's validators on a staged copy of its whole tree with every pending change applied
(``{path}`` / ``{tree}`` in their argv, quoted)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from reconciler.engine.run import (
    DEFAULT_TIMEOUT,
    VALIDATE_DIR,
    HostRun,
    action_rule,
    result_text,
    staged_path,
)
from reconciler.host.script import ScriptBuilder, prelude, run_framed, said
from reconciler.kinds.actions import (
    ActionKind,
)
from reconciler.kinds.resources import (
    FileResource,
    LinkResource,
    Validator,
)
from reconciler.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class CheckFailure:
    """One validator that failed, and what it was validating."""

    label: str
    message: str
    handler: str | None = None  # a handler validator (its whole tree)
    action: int | None = None  # a file's own validator
    unknown: bool = False  # validation did not finish: nothing is known to be valid


def validation_copy(path: str, token: str, idx: int) -> str:
    """Where a file's own validator reads the staged content when the file's directory is not
    root's alone: a root-only copy (the staged temp itself could be swapped for a link)."""
    return posixpath.join(VALIDATE_DIR, token, str(idx), posixpath.basename(path))


def validated_source(run: HostRun, i: int) -> str:
    a = run.plan.actions[i]
    assert a.path is not None
    if isinstance(a.target, FileResource) and not action_rule(a).strict:
        return validation_copy(a.path, run.token, i)
    return staged_path(a.path, run.token)


def _subst(text: str, *, path: str | None, tree: str | None) -> str:
    if path is not None:
        text = text.replace("{path}", path)
    if tree is not None:
        text = text.replace("{tree}", tree)
    return text


def _validator_cmd(b: ScriptBuilder, v: Validator, *, path: str | None) -> str:
    """A shell command line for one validator: every argument a reference to a positional
    argument; ``{tree}`` becomes the (quoted) value of the script variable ``$tree``."""
    marker = "\x00TREE\x00"
    parts = []
    for k, val in v.env:
        parts.append(_ref_with_tree(b, f"{k}={_subst(val, path=path, tree=marker)}", marker))
    argv = [_ref_with_tree(b, _subst(a, path=path, tree=marker), marker) for a in v.argv]
    env = ("env " + " ".join(parts) + " ") if parts else ""
    return env + " ".join(argv)


def _ref_with_tree(b: ScriptBuilder, text: str, marker: str) -> str:
    pieces = text.split(marker)
    return '"$tree"'.join(b.ref(p) if p else "" for p in pieces) or "''"


def needs_validation(run: HostRun, idx: list[int]) -> bool:
    """Whether any validator applies to these file actions (see ``validate_changes``)."""
    actions = run.plan.actions
    for i in idx:
        a = actions[i]
        if a.kind not in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK, ActionKind.DELETE):
            continue
        if isinstance(a.target, FileResource) and a.target.validators:
            return True
        if a.handler:
            try:
                if run.desired.handler(a.handler).validators:
                    return True
            except KeyError:
                continue
    return False


async def validate_changes(run: HostRun, idx: list[int]) -> list[CheckFailure]:
    """Run every relevant validator in one round trip; return the failures."""
    actions = run.plan.actions
    changed = [i for i in idx if actions[i].kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.RELINK)]
    changed += [i for i in idx if actions[i].kind is ActionKind.DELETE]
    # each validator is the function v_<n> (a subshell, stdout and stderr together), run as
    # section v.<n> of the one framing: its output cannot forge a frame (the nonce is on stdin);
    # one whose command is not installed says "skip <n>". Paths and argv are positional
    # arguments (``b.ref``), passed on to each function with "$@".
    b = ScriptBuilder()
    b.add("set -u")
    labels: list[str] = []
    owners: list[tuple[str | None, int | None]] = []

    def add(label: str, body: list[str], needs: str | None, owner: tuple[str | None, int | None]) -> None:
        n = len(labels)
        labels.append(label)
        owners.append(owner)
        guard = f"command -v {b.ref(needs)} >/dev/null 2>&1" if needs else "true"
        b.add(f"v_{n}() (")
        for line in body:
            b.add("  " + line)
        b.add(") 2>&1")
        b.add(f'if {guard}; then frame v.{n} v_{n} "$@"; else say skip {n}; fi')

    # the files' own validators, on the staged file
    for i in changed:
        t = actions[i].target
        if isinstance(t, FileResource):
            for v in t.validators:
                sp = validated_source(run, i)
                add(
                    f"{t.path}: {' '.join(v.argv)}",
                    [_validator_cmd(b, v, path=sp)],
                    v.needs_command,
                    (None, i),
                )
    # handler validators on a staged copy of the whole tree
    handlers = sorted({hn for i in changed if (hn := actions[i].handler)})
    for name in handlers:
        try:
            h = run.desired.handler(name)
        except KeyError:
            continue
        for v in h.validators:
            body: list[str] = []
            if v.tree_root:
                root = v.tree_root.rstrip("/") or "/"
                body.append("tmpd=$(mktemp -d /tmp/.reconciler-tree.XXXXXX) || exit 90")
                body.append(f'tree="$tmpd"/{b.ref(posixpath.basename(root) or "root")}')
                body.append(f'cp -a {b.ref(root)} "$tree" 2>/dev/null || mkdir -p "$tree"')
                for i in changed:
                    a = actions[i]
                    if not a.path or not a.path.startswith(root + "/"):
                        continue
                    rel = a.path[len(root) + 1 :]
                    dst = f'"$tree"/{b.ref(rel)}'
                    body.append(f'mkdir -p "$(dirname {dst})"')
                    if a.kind is ActionKind.DELETE:
                        body.append(f"rm -f {dst}")
                    elif isinstance(a.target, LinkResource):
                        lt = a.target.target
                        if lt.startswith(root + "/"):
                            lt_cmd = f'"$tree"/{b.ref(lt[len(root) + 1 :])}'
                        else:
                            lt_cmd = b.ref(lt)
                        body.append(f"rm -f {dst}; ln -s {lt_cmd} {dst}")
                    else:
                        body.append(f"rm -f {dst}; cp -p {b.ref(validated_source(run, i))} {dst}")
                # drop staged temps copied from the live tree: the copy must hold what will be live
                body.append("find \"$tree\" -name '.*.reconciler-*' -exec rm -f {} + 2>/dev/null")
                body.append(f"( cd / && {_validator_cmd(b, v, path=None)} ); vrc=$?")
                body.append('rm -rf "$tmpd"; exit $vrc')
                body = ["("] + ["  " + b for b in body] + [")"]
            else:
                body.append(f"cd / && {_validator_cmd(b, v, path=None)}")
            add(f"{name}: {' '.join(v.argv)}", body, v.needs_command, (name, None))
    if not labels:
        return []
    if any(validated_source(run, i).startswith(VALIDATE_DIR + "/") for i in changed):
        b.add(f"rm -rf -- {b.ref(posixpath.join(VALIDATE_DIR, run.token))}")
    conn = await run.conn()
    framed = await run_framed(conn, b.script(prelude()), b.args, timeout=DEFAULT_TIMEOUT)
    res = framed.result
    problems: list[CheckFailure] = []
    skipped = {
        int(w[1]) for w in (line.split() for line in said(framed.sections)) if w[1:2] and w[1].isdigit()
    }
    seen = set()
    for n, label in enumerate(labels):
        sec = framed.sections.get(f"v.{n}")
        if n in skipped:
            seen.add(n)
            run.messages.append(f"validator skipped ({label}): its command is not installed")
        elif sec is not None and sec.exit_status is not None:
            seen.add(n)
            if sec.exit_status != 0:
                message = f"{label} (exit {sec.exit_status}):\n{sec.text.strip()[-3000:]}"
                problems.append(CheckFailure(label, message, handler=owners[n][0], action=owners[n][1]))
    if len(seen) < len(labels):
        problems.append(
            CheckFailure(
                "validation",
                f"validation did not finish (exit {res.exit_status}): {result_text(res)[-2000:]}",
                unknown=True,
            )
        )
    return problems
