"""Kinds ``file`` and ``link``: the diff of declared files and symlinks against their observed
state (content by sha256, with a unified diff unless secret; mode; owner; link target; a path
whose directories are not root's alone is refused). Their change is the engine's file
transaction (``reconciler.engine.transaction``).

Their observation (``FilesKind``, always wanted: the host's own records are file paths too) is
ONE ``find -printf`` stating every declared path (files, links, key pairs, the persistent
rulesets, absent and expected paths) and the directories above them, ONE ``sha256sum -z`` of the
regular files whose directories pass shell-builtin checks, ONE ``find`` of the owned directories,
the path-safety helper (one ``perl``) for paths under a directory a user controls, and the
declared non-root owners and groups. Records parse in ``reconciler.kinds.filestate``."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from reconciler.host.pathsafe import HELPER, PERL, Batch, Rule, all_ancestors, rule_of
from reconciler.host.script import ScriptBuilder, Section
from reconciler.kinds.actions import Action, ActionKind
from reconciler.kinds.filestate import (
    FIND_FMT,
    file_states,
    files_ok,
    judged,
    owned_states,
    parse_find_records,
    parse_sha256,
)
from reconciler.kinds.kind import BaseKind, PlanStep, SectionReader, first_error
from reconciler.kinds.observed import FileState, Observed
from reconciler.kinds.resources import Desired, FileResource, LinkResource

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


# ---------------------------------------------------------------- observation

SHELL = r"""FMT='@FIND_FMT@'
st() { [ $# -eq 0 ] || find "$@" -maxdepth 0 -printf "$FMT"; }
# every directory above $1 is not a link and is owned by root (shell builtins: no process;
# the answer for the last directory asked is kept: files share directories); whatever else
# the policy refuses (group/other-writable) is judged from st's records
anc_ok() {
  _d=${1%/*}
  if [ "$_d" = "${_ok_d-/}" ]; then return "$_ok_rc"; fi
  _a=$_d; _ok_rc=0
  while [ -n "$_a" ]; do
    if [ -L "$_a" ] || [ ! -O "$_a" ]; then _ok_rc=1; break; fi
    _a=${_a%/*}
  done
  _ok_d=$_d
  return "$_ok_rc"
}
hs() {
  n=$#
  for p do if anc_ok "$p" && [ -f "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done
  shift "$n"
  [ $# -eq 0 ] || sha256sum -z -- "$@"
}
own() {
  n=$#
  for p do if anc_ok "$p" && [ -d "$p" ] && [ ! -L "$p" ]; then set -- "$@" "$p"; fi; done
  shift "$n"
  [ $# -eq 0 ] || find "$@" -mindepth 1 ! -type d -printf "$FMT"
}
# "u:NAME" / "g:NAME": does the user/group exist? /etc/passwd|group with builtins, else NSS
ids() {
  for a do
    k=${a%%:*}; n=${a#*:}; f=0
    if [ "$k" = u ]; then db=/etc/passwd; ns=passwd; else db=/etc/group; ns=group; fi
    if [ -r "$db" ]; then
      while IFS=: read -r e _r; do if [ "$e" = "$n" ]; then f=1; break; fi; done < "$db"
    fi
    if [ $f = 0 ] && getent "$ns" "$n" >/dev/null 2>&1; then f=1; fi
    printf '%s %s %s\n' "$k" "$n" "$f"
  done
}
file_head() {
  if anc_ok "$1" && [ -f "$1" ] && [ ! -L "$1" ]; then head -c "$2" -- "$1"; return; fi
  echo "$1 changed since it was observed (no longer a regular file under root-only directories)" >&2
  return 3
}
""".replace("@FIND_FMT@", FIND_FMT)


@dataclass(frozen=True)
class Probe:
    """The managed paths of a host: which to hash, which must never be read."""

    hashed: tuple[str, ...]  # regular files compared by sha256 (declared files, public keys)
    unhashed: tuple[str, ...]  # stat only (links, private keys)
    dirs: tuple[str, ...]  # owned directories to list
    secret: frozenset[str] = field(default_factory=frozenset)  # never fetch content
    # paths under a directory a non-root user controls (the fleet says so): observed only
    # through the path-safety helper, never by find/sha256sum; (path, rule, hash it)
    guarded: tuple[tuple[str, Rule, bool], ...] = ()
    users: tuple[str, ...] = ()  # non-root owners the files declare (do they exist?)
    groups: tuple[str, ...] = ()

    def ancestors(self) -> tuple[str, ...]:
        """The directories above every path find stats (and the owned directories): their
        records decide whether the paths are root's alone (``reconciler.host.pathsafe.refusal``)."""
        return all_ancestors((*self.hashed, *self.unhashed, *(f"{d}/x" for d in self.dirs)))

    def rules(self) -> dict[str, Rule]:
        return {p: r for p, r, _ in self.guarded}


def probe_for(desired: Desired) -> Probe:
    hashed: dict[str, None] = {}
    unhashed: dict[str, None] = {}
    guarded: dict[str, tuple[Rule, bool]] = {}
    secret: set[str] = set()
    users: dict[str, None] = {}
    groups: dict[str, None] = {}
    for f in desired.files:
        rule = rule_of(f)
        if rule.strict:
            hashed[f.path] = None
        else:
            guarded[f.path] = (rule, True)
            users[rule.user] = None
        if f.secret:
            secret.add(f.path)
        users[f.owner] = None
        groups[f.group] = None
    if desired.firewall is not None:
        hashed[desired.firewall.persistent_path] = None
        if desired.firewall.rules_v6 is not None:
            hashed[desired.firewall.persistent_path_v6] = None
    for kp in desired.keypairs:
        unhashed[kp.private_path] = None
        secret.add(kp.private_path)
        hashed[kp.public_path] = None
    for lk in desired.links:
        rule = rule_of(lk)
        if rule.strict:
            unhashed[lk.path] = None
        else:
            guarded.setdefault(lk.path, (rule, False))
            users[rule.user] = None
    for path in (*(a.path for a in desired.absent), *(e.path for e in desired.expects)):
        if path not in hashed and path not in guarded:
            unhashed[path] = None
    for p in hashed:
        unhashed.pop(p, None)
    for p in guarded:
        hashed.pop(p, None)
        unhashed.pop(p, None)
    return Probe(
        hashed=tuple(hashed),
        unhashed=tuple(unhashed),
        dirs=tuple(desired.owned_dirs),
        secret=frozenset(secret),
        guarded=tuple((p, r, h) for p, (r, h) in guarded.items()),
        users=tuple(u for u in users if u != "root"),
        groups=tuple(g for g in groups if g != "root"),
    )


def parse_ids(sec: Section | None, probe: Probe, errors: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The declared non-root owners and groups the host does not know (``ids`` lines)."""
    if not probe.users and not probe.groups:
        return frozenset(), frozenset()
    if sec is None or sec.exit_status is None:
        errors.append("users and groups: no answer (observation cut short)")
        return frozenset(), frozenset()
    users: set[str] = set()
    groups: set[str] = set()
    for line in sec.body.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "0":
            (users if parts[0] == "u" else groups).add(parts[1])
    return frozenset(users), frozenset(groups)


def absolute(path: str) -> str:
    """Paths reach ``find`` as starting points: only absolute ones (never an option or ``!``)."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    return path


class FilesKind(BaseKind):
    name = "files"
    shell = SHELL

    def wanted(self, desired: Desired) -> bool:
        return True  # the inventory and the owned directories need the records even without files

    def probe(self, desired: Desired, b: ScriptBuilder) -> None:
        probe = probe_for(desired)
        # the paths' directories first: one find call judges them all (few, and shared)
        stat_list = [*probe.ancestors(), *probe.hashed, *probe.unhashed]
        stat_paths = b.refs([absolute(p) for p in stat_list])
        b.add(f"frame files st {stat_paths}".rstrip())
        hashed = b.refs([absolute(p) for p in probe.hashed])
        b.add(f"frame hashes hs {hashed}".rstrip())
        if probe.dirs:
            b.add(f"frame owned own {b.refs([absolute(d) for d in probe.dirs])}")
        if probe.guarded:
            safe = Batch()
            for p, rule, hash_it in probe.guarded:
                safe.stat(absolute(p), rule, hash_it=hash_it)
            safe.flush("safe")
            b.add("printf '@@%s<safe\\n' \"$N\" >&2")
            b.add(f"RCL_N=$N {PERL} -e {b.ref(HELPER)} -- args {b.refs(safe.args())}")
        if probe.users or probe.groups:
            names = [f"u:{u}" for u in probe.users] + [f"g:{g}" for g in probe.groups]
            b.add(f"frame ids ids {b.refs(names)}")

    def parse(self, desired: Desired, read: SectionReader, observed: Observed) -> Observed:
        errors: list[str] = []
        probe = probe_for(desired)
        files: dict[str, FileState] = {}
        records: dict[str, FileState] = {}
        declared, hashed = read.section("files"), read.section("hashes")
        if declared is None or hashed is None:
            errors.append("files: no answer (observation cut short)")
        elif files_ok(declared, "files", errors) and files_ok(hashed, "file hashes", errors):
            records = parse_find_records(declared.body)
        owned = read.section("owned")
        if owned is not None:
            if files_ok(owned, "owned directories", errors) and records:
                files.update(owned_states(parse_find_records(owned.body), desired.owned_dirs, records))
        elif desired.owned_dirs:
            errors.append("owned directories: no answer (observation cut short)")
        if records and hashed is not None:
            asked = (*probe.hashed, *probe.unhashed)
            files.update(judged(file_states(asked, records, parse_sha256(hashed.body)), records))
        if probe.guarded:
            st, hs = read.section("safe.st"), read.section("safe.hs")
            if st is None or hs is None or st.exit_status is None or hs.exit_status is None:
                detail = f": {first_error(st.stderr)}" if st is not None and st.stderr else ""
                errors.append(f"files under user-controlled directories: no answer (perl ran?){detail}")
            else:
                if hs.exit_status != 0:
                    errors.append(f"files under user-controlled directories: sha256sum exit {hs.exit_status}")
                asked = tuple(p for p, _, _ in probe.guarded)
                files.update(file_states(asked, parse_find_records(st.body), parse_sha256(hs.body)))
        unknown_users, unknown_groups = parse_ids(read.section("ids"), probe, errors)
        for e in errors:
            read.error(e)
        return replace(
            observed,
            files=MappingProxyType(dict(sorted(files.items()))),
            unknown_users=unknown_users,
            unknown_groups=unknown_groups,
        )

    def plan(self, step: PlanStep) -> Sequence[Action]:
        return [*plan_files(step.kept.files, step.observed), *plan_links(step.kept.links, step.observed)]


KIND = FilesKind()
