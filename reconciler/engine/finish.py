"""The last round trip of an apply: remove this apply's backups (and leftovers of interrupted
ones), clear the pending-reloads journal once every pending reload ran, write the inventory and
then the host identity, both only when every action succeeded."""

from __future__ import annotations

import posixpath

from reconciler.engine.identity import IDENTITY_PATH, format_identity
from reconciler.engine.plan import INTERRUPTED, inventory_json
from reconciler.engine.run import PENDING_RELOADS_PATH, HostRun, action_rule, new_batch, result_text
from reconciler.host import pathsafe
from reconciler.host.pathsafe import Rule, rule_of
from reconciler.host.script import prelude, run_framed, said
from reconciler.host.state import INVENTORY_PATH
from reconciler.kinds.actions import (
    FILE_KINDS,
    ActionKind,
)
from reconciler.log import get_logger

log = get_logger(__name__)

# $1 inventory path ("" = do not record), $2 temp suffix, $3 journal path, $4 identity path
# ("" = do not record), $5 the identity file's text; then "--", journal lines (or "-" to leave
# the journal alone, nothing to clear it), "--", backups to remove. stdin: the inventory.
# The identity is written after the inventory and never without it (a new identity over an
# old inventory would let the next plan prune another fleet's paths).
FINISH = (
    prelude(keep_stdin=True)
    + r"""
set -u
inv=$1; tmpsfx=$2; j=$3; idp=$4; idc=$5; shift 6
if [ "${1:-}" = - ]; then shift
elif [ "${1:-}" = -- ]; then rm -f "$j" || say J cannot clear "$j"
else
  mkdir -p "${j%/*}"; t="${j%/*}/.pending-reloads.reconciler-$tmpsfx"; : > "$t"
  while [ $# -gt 0 ] && [ "$1" != -- ]; do printf '%s\n' "$1" >> "$t"; shift; done
  mv -f "$t" "$j" || say J cannot write "$j"
fi
[ "${1:-}" = -- ] && shift
# leftovers (.NAME.reconciler-*: this run's backups, temps and backups of interrupted runs):
# first in root-only directories, by name (a link is removed, never followed; only root can
# change those directories), then "--" and the path-safety helper with its operations for
# directories another user controls
while [ $# -gt 0 ] && [ "$1" != -- ]; do rm -f -- "$1"/.*.reconciler-* 2>/dev/null; shift; done
[ "${1:-}" = -- ] && shift
if [ $# -gt 0 ]; then h=$1; shift; perl -e "$h" -- args "$@" || say C cannot remove leftovers; fi
if [ -n "$inv" ]; then
  d=${inv%/*}; t="$d/.inventory.json.reconciler-$tmpsfx"
  if mkdir -p "$d" && cat > "$t" && mv -f "$t" "$inv"; then say INV ok
  else rm -f "$t"; say INV failed; idp=; fi
fi
if [ -n "$idp" ]; then
  d=${idp%/*}; t="$d/.identity.reconciler-$tmpsfx"
  if mkdir -p "$d" && printf '%s' "$idc" > "$t" && chmod 0644 "$t" && mv -fT "$t" "$idp"
  then say ID ok
  else rm -f "$t"; say ID failed; fi
fi
"""
)


def _leftover_args(run: HostRun) -> list[str]:
    """FINISH's arguments that remove this apply's backups and any leftovers
    (``.NAME.reconciler-*``) of interrupted earlier ones from the directories of this plan's
    files and of the handlers an interrupted apply left in the journal (a kill during a reload
    leaves its backups behind): root-only directories by shell glob (no process but ``rm``),
    then "--" and the path-safety helper's operations for directories another user controls."""
    actions = run.plan.actions
    interrupted = {a.handler for a in actions if a.kind is ActionKind.RELOAD and INTERRUPTED in a.reason}
    where: dict[str, tuple[str, Rule]] = {}
    for a in actions:
        if a.kind in FILE_KINDS and a.path:
            where.setdefault(posixpath.dirname(a.path), (a.path, action_rule(a)))
    for f in run.desired.files:
        if f.handler in interrupted:
            where.setdefault(posixpath.dirname(f.path), (f.path, rule_of(f)))
    strict = [d for d, (_, rule) in where.items() if rule.strict]
    guarded = [(p, rule) for p, rule in where.values() if not rule.strict]
    if not guarded:
        return strict
    b = new_batch(run)
    for p, rule in guarded:
        b.clean(p, rule, keep_token=False)
    return [*strict, "--", pathsafe.HELPER, *b.args()]


async def finish_phase(run: HostRun) -> None:
    """One round trip: remove this apply's backups (and leftovers of interrupted ones), bring
    the pending-reloads journal up to date (cleared once every pending reload ran), record the
    inventory if every action succeeded."""
    backups = [i for i, b in run.swapped.items() if b]
    all_ok = not any(o.status in ("failed", "skipped") for o in run.outcomes.values())
    record = [i for i in run.indices({ActionKind.RECORD_INVENTORY})]
    ident = [i for i in run.indices({ActionKind.RECORD_IDENTITY})]
    if not all_ok:
        for i in record + ident:
            run.mark(i, "skipped", "not recorded: the apply did not fully succeed")
        ident = []
    identity = run.plan.identity if ident else None
    journal = ["-"] if run.journal is None else sorted(run.journal)
    # the inventory is rewritten only when it changes (the plan's observation read it)
    seen = run.plan.observed
    unchanged = seen is not None and not seen.errors and tuple(sorted(seen.inventory)) == run.plan.inventory
    write_inventory = all_ok and (bool(record) or not unchanged)
    if run.journal is None and not backups and not write_inventory and identity is None:
        return
    leftovers = _leftover_args(run) if backups or run.journal is not None else []
    args = (INVENTORY_PATH if write_inventory else "", run.token, PENDING_RELOADS_PATH,
            IDENTITY_PATH if identity is not None else "",
            format_identity(identity).decode() if identity is not None else "",
            "--", *journal, "--", *leftovers)  # fmt: skip
    run.finished = True
    conn = await run.conn()
    framed = await run_framed(
        conn,
        FINISH,
        args,
        stdin_after=inventory_json(run.plan.inventory) if write_inventory else b"",
        timeout=60,
    )
    res = framed.result
    lines = said(framed.sections)
    run.messages += [line.split(" ", 1)[1] for line in lines if line.startswith(("J ", "C "))]
    if identity is not None:
        written = "ID ok" in lines
        for i in ident:
            run.mark(
                i, "done" if written else "failed", "" if written else f"not written: {result_text(res)}"
            )
        if not written:
            run.messages.append(f"could not record the host identity {IDENTITY_PATH}: {result_text(res)}")
    if not write_inventory:
        return
    ok = "INV ok" in lines
    for i in record:
        run.mark(i, "done" if ok else "failed", "" if ok else result_text(res))
    if not ok:
        run.messages.append(f"could not record the inventory: {result_text(res)}")
