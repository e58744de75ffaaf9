"""Packages on a host: apt-get/dpkg (the service manager: ``reconciler.kinds.service_manager``).

Used by ``reconciler.engine.apply`` (the packages phase and the services phase) and, for the names to
observe, by ``reconciler.engine.observe``. Every value from the fleet (package and service names, paths)
travels as a positional argument or an argv element, never inside script text.

apt-get runs non-interactively (``DEBIAN_FRONTEND=noninteractive``, ``--force-confdef
--force-confold``, ``--no-install-recommends``), under ``timeout``, and never waits for the
dpkg lock (``-o DPkg::Lock::Timeout=0``): a lock held by another process (an unattended upgrade,
an admin's apt-get) is reported with that process's pid and retried later. ``apt-get update``
runs only when a planned package has no install candidate (one still without a candidate fails
alone, with apt's own line). Installing removes only the packages the fleet allows (a role's
``replaces``, checked against ``apt-get -s`` on the host; else ``--no-remove``); a purge is
refused when apt would remove any package the fleet did not name. A failed transaction is
retried package by package. Nothing here ever runs ``autoremove``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from reconciler.host.script import Runner, Sections, numbered, prelude, run_framed, said
from reconciler.kinds.resources import Desired
from reconciler.log import get_logger

log = get_logger(__name__)

INSTALL_TIMEOUT = 600.0  # seconds for one apt-get install/purge run
UPDATE_TIMEOUT = 180.0  # seconds for apt-get update (only when a candidate is missing)
LOG_TAIL = 25  # lines of apt/dpkg output (or a service's log) shown in a report

# Debian package names (policy 5.6.1), optionally with an architecture qualifier.
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?::[a-z0-9-]+)?$")
_LOCK = re.compile(
    r"Could not get lock (?P<path>\S+?)\.?\s+It is held by process (?P<pid>\d+)(?: \((?P<comm>[^)]*)\))?"
)
_LOCK_NO_PID = re.compile(
    r"Could not get lock (?P<path>\S+?)\.?(?:\s|$)|Unable to acquire the dpkg frontend lock"
    r"|Unable to lock the administration directory|is another process using it"
)


def needed_packages(desired: Desired) -> tuple[str, ...]:
    """Every package name the plan must know the state of: the declared packages and every
    ``needs_package`` of a file, link, key pair or service (sorted, unique)."""
    names = {p.name for p in desired.packages}
    deps: list[str | None] = [f.needs_package for f in desired.files]
    deps += [lk.needs_package for lk in desired.links]
    deps += [k.needs_package for k in desired.keypairs]
    deps += [s.needs_package for s in desired.services]
    names.update(d for d in deps if d)
    return tuple(sorted(names))


def check_package_name(name: str) -> str:
    if not _PACKAGE_NAME.match(name):
        raise ValueError(f"not a Debian package name: {name!r}")
    return name


# ---------------------------------------------------------------- dpkg lock


@dataclass(frozen=True)
class LockHolder:
    path: str  # e.g. /var/lib/dpkg/lock-frontend
    pid: int | None = None
    command: str | None = None

    def message(self) -> str:
        who = ""
        if self.pid is not None:
            who = f" (pid {self.pid}" + (f", {self.command}" if self.command else "") + ")"
        what = "the apt package lists are" if "/lists/" in self.path else "dpkg is"
        return f"{what} locked by another process{who} [{self.path}]; nothing installed, will retry"


def parse_lock(text: str) -> LockHolder | None:
    """apt's "Could not get lock ... It is held by process N (name)" (or an older wording)."""
    m = _LOCK.search(text)
    if m:
        return LockHolder(m.group("path"), int(m.group("pid")), m.group("comm") or None)
    m2 = _LOCK_NO_PID.search(text)
    if m2:
        path = m2.groupdict().get("path") or "/var/lib/dpkg/lock-frontend"
        return LockHolder(path)
    return None


# ---------------------------------------------------------------- apt-get


# On the one framing: events and package states are said ("APT <event>", "PKG <name>
# <dpkg status>", "ERR <name> <apt's E: line>"), the tails of apt/dpkg's log are sections
# log.<n>; apt's output (a package's own maintainer scripts print there) cannot forge them.
APT_SCRIPT = (
    prelude()
    + r"""
set -u
verb=$1; t_apt=$2; t_update=$3; nallow=$4; shift 4
# the packages apt may remove to install these (a role's replaces), then the package names
allow=""; i=0
while [ $i -lt "$nallow" ]; do allow="$allow $1"; shift; i=$((i+1)); done
DEBIAN_FRONTEND=noninteractive; export DEBIAN_FRONTEND
APT_LISTCHANGES_FRONTEND=none; export APT_LISTCHANGES_FRONTEND
log=$(mktemp /tmp/.reconciler-apt.XXXXXX) || { say APT error cannot create a temp file; exit 0; }
trap 'rm -f "$log"' EXIT
_logs=0
tail_log() { _logs=$((_logs + 1)); frame "log.$_logs" tail -n TAIL "$log"; }
status() {
  for p do
    if s=$(dpkg-query -W -f='${db:Status-Abbrev}' -- "$p" 2>/dev/null); then say PKG "$p" "$s"
    else say PKG "$p" missing; fi
  done
}
report() {  # $1 = exit status of apt-get (124/137: timed out); then the package names
  rc=$1; shift
  case $rc in
    0) say APT ok ;;
    124|137) say APT timeout "$rc" ;;
    *) say APT failed "$rc" ;;
  esac
  status "$@"
  [ "$rc" = 0 ] || tail_log
}
no_candidate() {
  c=$(apt-cache policy -- "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | head -n 1)
  case $c in ''|'(none)') return 0 ;; esac
  return 1
}
# apt and dpkg lock with fcntl (apt-get below reports the holder's pid); a script that
# serialises its apt runs with flock(1) on the same file is only visible to flock itself
if [ -e /var/lib/dpkg/lock-frontend ] && command -v flock >/dev/null 2>&1; then
  flock -n -E 75 /var/lib/dpkg/lock-frontend true 2>/dev/null
  if [ $? = 75 ]; then say APT flocked /var/lib/dpkg/lock-frontend; status "$@"; exit 0; fi
fi
if [ "$verb" = install ]; then
  need_update=0
  for p do if no_candidate "$p"; then need_update=1; fi; done
  if [ $need_update = 1 ]; then
    say APT update
    timeout -k 10 "$t_update" apt-get -q -o DPkg::Lock::Timeout=0 update >"$log" 2>&1; rc=$?
    if [ $rc != 0 ]; then say APT update-failed "$rc"; tail_log; fi
    # a package still without a candidate fails alone, with apt's own line; the others go on
    for p do
      shift
      if no_candidate "$p"; then
        say APT no-candidate "$p"
        e=$(apt-get -s -q -o Debug::NoLocking=1 install -- "$p" 2>&1 | grep '^E: ' | head -n 1)
        say ERR "$p" "${e:-E: Package '$p' has no installation candidate}"
      else set -- "$@" "$p"; fi
    done
    [ $# -gt 0 ] || exit 0
  fi
  noremove=--no-remove
  if [ -n "$allow" ]; then
    # removals only of packages the fleet allows (replaces), checked again against apt's solution
    sim=$(apt-get -s -q -o Debug::NoLocking=1 --no-install-recommends install -- "$@" 2>&1)
    extra=0
    for r in $(printf '%s\n' "$sim" | sed -n 's/^\(Purg\|Remv\) \([^ ]*\).*/\2/p'); do
      ok=0
      for a in $allow; do if [ "$r" = "$a" ] || [ "${r%%:*}" = "$a" ]; then ok=1; fi; done
      if [ $ok = 0 ]; then say APT would-remove "$r"; extra=1; fi
    done
    if [ $extra = 1 ]; then status "$@"; exit 0; fi
    noremove=
  fi
  timeout -k 30 "$t_apt" apt-get -y -q -o DPkg::Lock::Timeout=0 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    --no-install-recommends $noremove install -- "$@" >"$log" 2>&1
  report $? "$@"
else
  # a purge never takes anything the fleet did not name with it
  sim=$(apt-get -s -q -o DPkg::Lock::Timeout=0 purge -- "$@" 2>&1); rc=$?
  if [ $rc != 0 ]; then
    printf '%s\n' "$sim" > "$log"; say APT failed "$rc"; status "$@"; tail_log; exit 0
  fi
  extra=0
  for r in $(printf '%s\n' "$sim" | sed -n 's/^\(Purg\|Remv\) \([^ ]*\).*/\2/p'); do
    named=0
    for p do if [ "$r" = "$p" ] || [ "${r%%:*}" = "$p" ]; then named=1; fi; done
    if [ $named = 0 ]; then say APT would-remove "$r"; extra=1; fi
  done
  if [ $extra = 1 ]; then status "$@"; exit 0; fi
  timeout -k 30 "$t_apt" apt-get -y -q -o DPkg::Lock::Timeout=0 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold purge -- "$@" >"$log" 2>&1
  report $? "$@"
fi
""".replace("TAIL", str(LOG_TAIL))
)


@dataclass(frozen=True)
class AptRun:
    """What one apt-get run did, parsed from the script's markers."""

    verb: str  # "install" or "purge"
    names: tuple[str, ...]
    ok: bool  # every package ended in the wanted state
    done: tuple[str, ...] = ()  # packages now in the wanted state
    failed: tuple[tuple[str, str], ...] = ()  # (package, why) for the others
    lock: LockHolder | None = None  # dpkg was locked: nothing ran; retry later
    updated: bool = False  # apt-get update ran (a package had no candidate)
    output_tail: str = ""  # the last lines of apt/dpkg output when something failed
    retried: tuple[str, ...] = ()  # installed alone after the whole transaction failed

    @property
    def transient(self) -> bool:
        return self.lock is not None

    def summary(self) -> str:
        if self.ok:
            return f"apt-get {self.verb} {' '.join(self.names)}: done" + (
                " (after apt-get update)" if self.updated else ""
            )
        head = f"apt-get {self.verb} {' '.join(self.names)} failed"
        if self.retried:
            head += f"; tried alone: {' '.join(self.retried)}"
        if self.lock is not None:
            head = f"apt-get {self.verb} {' '.join(self.names)} not run: {self.lock.message()}"
        lines = [head]
        lines += [f"  {name}: {why}" for name, why in self.failed]
        if self.output_tail and self.lock is None:
            lines.append("  last lines of apt/dpkg output:")
            lines += ["    " + ln for ln in self.output_tail.splitlines()]
        return "\n".join(lines)


def _state_ok(verb: str, abbrev: str) -> bool:
    if verb == "install":
        return abbrev[:2] == "ii"
    return abbrev == "missing" or (len(abbrev) >= 2 and abbrev[1] == "n")


def _state_words(abbrev: str) -> str:
    if abbrev == "missing":
        return "unknown to dpkg"
    states = {
        "n": "not installed",
        "c": "only its config files remain",
        "H": "half-installed",
        "U": "unpacked but not configured",
        "F": "half-configured (a maintainer script failed)",
        "W": "awaiting triggers",
        "t": "triggers pending",
        "i": "installed",
    }
    word = states.get(abbrev[1:2], f"dpkg status {abbrev.strip()!r}")
    if abbrev[2:3] == "R":
        word += ", reinstall required"
    return word


def parse_apt_output(verb: str, names: Sequence[str], sections: Sections) -> AptRun:
    """Parse what ``APT_SCRIPT`` said and its log sections (pure; unit-tested)."""
    states: dict[str, str] = {}
    failed_reason = ""
    no_candidate: list[str] = []
    apt_lines: dict[str, str] = {}  # package -> apt's own E: line about it
    would_remove: list[str] = []
    updated = False
    tail: list[str] = []
    ran_ok = False
    flocked: LockHolder | None = None
    for log_text in numbered(sections, "log"):
        # dpkg's progress: keep the last state of a line
        tail += [line.rstrip("\r").split("\r")[-1] for line in log_text.splitlines()]
    for line in said(sections):
        if line.startswith("ERR "):
            parts = line.split(" ", 2)
            if len(parts) == 3:
                apt_lines[parts[1]] = parts[2]
        elif line.startswith("PKG "):
            parts = line.split(" ", 2)
            if len(parts) == 3:
                states[parts[1]] = parts[2]
        elif line.startswith("APT "):
            word = line[4:].split()
            if not word:
                continue
            if word[0] == "ok":
                ran_ok = True
            elif word[0] == "update":
                updated = True
            elif word[0] == "update-failed":
                failed_reason = f"apt-get update failed (exit {word[1] if len(word) > 1 else '?'})"
            elif word[0] == "timeout":
                failed_reason = (
                    f"apt-get {verb} timed out and was stopped; if dpkg was interrupted, "
                    "the next run says so (fix with: dpkg --configure -a)"
                )
            elif word[0] == "failed":
                failed_reason = f"apt-get {verb} failed (exit {word[1] if len(word) > 1 else '?'})"
            elif word[0] == "no-candidate" and len(word) > 1:
                no_candidate.append(word[1])
            elif word[0] == "would-remove" and len(word) > 1:
                would_remove.append(word[1])
            elif word[0] == "error":
                failed_reason = " ".join(word[1:])
            elif word[0] == "flocked":
                flocked = LockHolder(word[1] if len(word) > 1 else "/var/lib/dpkg/lock-frontend")
    output = "\n".join(tail).strip()
    e_lines = [ln for ln in tail if ln.startswith("E: ")]
    if e_lines and failed_reason.startswith(f"apt-get {verb} failed"):
        failed_reason += ": " + e_lines[0]
    lock = flocked or (parse_lock(output) if not ran_ok else None)
    done: list[str] = []
    failed: list[tuple[str, str]] = []
    for name in names:
        st = states.get(name, "")
        if st and _state_ok(verb, st):
            done.append(name)
            continue
        if lock is not None:
            why = lock.message()
        elif name in no_candidate:
            why = apt_lines.get(name) or "no installation candidate"
            why += " (after apt-get update; check the package name and the host's apt sources)"
        elif would_remove:
            why = (
                "not purged: apt would also remove "
                + ", ".join(would_remove)
                + " (not named by the fleet; purge them explicitly or list them in the role's replaces)"
            )
        else:
            now = _state_words(st) if st else "state unknown"
            why = f"{failed_reason or 'apt-get did not finish'}; now {now}"
        failed.append((name, why))
    return AptRun(
        verb=verb,
        names=tuple(names),
        ok=not failed,
        done=tuple(done),
        failed=tuple(failed),
        lock=lock,
        updated=updated,
        output_tail=output if failed else "",
    )


async def apt(
    conn: Runner,
    verb: str,
    names: Iterable[str],
    *,
    timeout: float = INSTALL_TIMEOUT,
    update_timeout: float = UPDATE_TIMEOUT,
    allow_removal: Iterable[str] = (),
) -> AptRun:
    """Run ``apt-get install`` or ``apt-get purge`` for ``names`` in one round trip.

    ``allow_removal``: packages apt may remove to install these (a role's ``replaces``; any
    other removal still aborts). When the whole install transaction fails, each package that
    did not install is tried alone (one more round trip each), so one bad package blocks only
    itself and what depends on it."""
    run = await _apt_once(conn, verb, names, timeout, update_timeout, allow_removal)
    transaction_failed = [n for n, why in run.failed if why.startswith(f"apt-get {verb} failed")]
    if verb != "install" or len(run.names) < 2 or not transaction_failed or run.lock is not None:
        return run
    done = list(run.done)
    failed = dict(run.failed)
    tails: list[str] = [run.output_tail] if run.output_tail else []
    for name in transaction_failed:
        alone = await _apt_once(conn, verb, [name], timeout, update_timeout, allow_removal)
        if alone.ok:
            done.append(name)
            failed.pop(name, None)
        else:
            failed[name] = dict(alone.failed).get(name, failed[name])
            if alone.output_tail:
                tails.append(alone.output_tail)
        if alone.lock is not None:
            break
    return replace(
        run,
        ok=not failed,
        done=tuple(n for n in run.names if n in done),
        failed=tuple((n, failed[n]) for n in run.names if n in failed),
        retried=tuple(transaction_failed),
        output_tail="\n".join(tails[-2:]) if failed else "",
    )


async def _apt_once(
    conn: Runner,
    verb: str,
    names: Iterable[str],
    timeout: float,
    update_timeout: float,
    allow_removal: Iterable[str],
) -> AptRun:
    if verb not in ("install", "purge"):
        raise ValueError(f"unknown apt verb {verb!r}")
    pkgs = [check_package_name(n) for n in names]
    allow = [check_package_name(n) for n in allow_removal] if verb == "install" else []
    if not pkgs:
        return AptRun(verb, (), True)
    framed = await run_framed(
        conn,
        APT_SCRIPT,
        (verb, str(int(timeout)), str(int(update_timeout)), str(len(allow)), *allow, *pkgs),
        timeout=timeout + update_timeout + 120,
    )
    res = framed.result
    run = parse_apt_output(verb, pkgs, framed.sections)
    if not any(line.startswith("APT ") for line in said(framed.sections)):
        # the script itself did not run (no sh, killed): report what we have
        detail = (res.stderr + res.stdout).decode(errors="replace").strip()[-1500:]
        run = AptRun(
            verb,
            tuple(pkgs),
            False,
            failed=tuple((n, f"apt script did not run (exit {res.exit_status}): {detail}") for n in pkgs),
        )
    log.info(
        "packages.apt",
        host=getattr(conn, "host", "?"),
        verb=verb,
        packages=pkgs,
        ok=run.ok,
        locked=run.lock is not None,
        updated=run.updated,
    )
    return run
