"""Packages as apt sees them: ``apt-get -s`` on the host, parsed, and the removal policy.

The plan asks apt for its solution of the whole package transaction (installs, and purges as
``NAME-`` with ``--purge``) in one read-only round trip, only when the plan has package actions
(never on the no-op path). apt's answer lists what it would install (the declared packages and
their dependencies), upgrade and remove. A removal is allowed only when the fleet purges that
package or a role ``replaces`` it; any other removal is a plan error with apt's line, and nothing
is applied on the host. A package apt cannot find (``E: Unable to locate package X``) is left
out of the simulation and reported with apt's own line; the apply runs ``apt-get update`` before
giving up on it, and it fails alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from reconciler.host.script import Runner, Sections, prelude, run_framed
from reconciler.log import get_logger

log = get_logger(__name__)

SIM_TIMEOUT = 120.0

# $1 = how many of the names are installs; the rest are purges (simulated as NAME- with --purge).
# A name apt cannot locate is dropped and the simulation runs again (at most 8 rounds). Each
# round's output is section sim.<round> of the one framing, its exit status apt's.
SIM_SCRIPT = (
    prelude()
    + r"""
set -u
n=$1; shift
emit() { printf '%s\n' "$1"; return "$2"; }
i=0
for p do
  shift; i=$((i+1))
  if [ $i -le "$n" ]; then set -- "$@" "$p"; else set -- "$@" "$p-"; fi
done
round=0
while [ $# -gt 0 ] && [ $round -lt 8 ]; do
  round=$((round+1))
  out=$(apt-get -s -q -o Debug::NoLocking=1 --purge --no-install-recommends install -- "$@" 2>&1); rc=$?
  frame "sim.$round" emit "$out" "$rc"
  [ $rc = 0 ] && exit 0
  bad=$(printf '%s\n' "$out" | sed -n \
    -e "s/^E: Unable to locate package \([^ ]*\)$/\1/p" \
    -e "s/^E: Package '\([^']*\)' has no installation candidate$/\1/p")
  [ -n "$bad" ] || exit 0
  for p do
    shift; keep=1
    for b in $bad; do [ "$p" = "$b" ] && keep=0; done
    [ $keep = 1 ] && set -- "$@" "$p"
  done
done
"""
)

_INST = re.compile(r"^Inst (\S+)(?: \[([^\]]*)\])?(?: \((\S+)[^)]*\))?")
_REMOVE = re.compile(r"^(Remv|Purg) (\S+)(?: \[([^\]]*)\])?")
_NOT_FOUND = (
    re.compile(r"^E: Unable to locate package (\S+)$"),
    re.compile(r"^E: Package '([^']+)' has no installation candidate$"),
)


@dataclass(frozen=True)
class AptChange:
    package: str
    version: str = ""  # the version apt would install ("" for a removal)
    old_version: str = ""  # the installed version (upgrade, removal)

    def line(self) -> str:
        if self.version and self.old_version:
            return f"{self.package} {self.old_version} -> {self.version}"
        return f"{self.package} {self.version or self.old_version}".strip()


@dataclass(frozen=True)
class AptSimulation:
    """apt's solution for one host's package transaction (``apt-get -s``)."""

    installs: tuple[AptChange, ...] = ()
    upgrades: tuple[AptChange, ...] = ()
    removals: tuple[AptChange, ...] = ()
    not_found: tuple[tuple[str, str], ...] = ()  # (package, apt's E: line)
    errors: tuple[str, ...] = ()  # apt's other E: lines (the last round failed)
    ran: bool = True  # False: the simulation could not run at all (errors says why)

    @property
    def ok(self) -> bool:
        return self.ran and not self.errors

    def summary(self) -> str:
        parts = [f"{len(self.installs)} to install"]
        if self.upgrades:
            parts.append(f"{len(self.upgrades)} to upgrade ({', '.join(c.package for c in self.upgrades)})")
        if self.removals:
            parts.append(f"{len(self.removals)} to remove ({', '.join(c.package for c in self.removals)})")
        return "apt-get -s: " + ", ".join(parts)


def parse_simulation(sections: Sections, raw: str = "") -> AptSimulation:
    """Parse ``SIM_SCRIPT``'s sections ``sim.<round>`` (pure; unit-tested). The last round is
    apt's solution; every round's "cannot find" lines are kept. ``raw``: the script's whole
    output, for the error when no round ran."""
    n = len("sim.")
    keys = sorted((k for k in sections if k.startswith("sim.") and k[n:].isdigit()), key=lambda k: int(k[n:]))
    rounds: list[tuple[int, list[str]]] = []
    for k in keys:
        sec = sections[k]
        rc = sec.exit_status if sec.exit_status is not None else -1
        rounds.append((rc, [line.rstrip("\r") for line in sec.text.splitlines()]))
    if not rounds:
        return AptSimulation(ran=False, errors=("apt-get -s did not run: " + raw.strip()[-300:],))
    not_found: dict[str, str] = {}
    for _, lines in rounds:
        for ln in lines:
            for pat in _NOT_FOUND:
                m = pat.match(ln)
                if m:
                    not_found.setdefault(m.group(1), ln)
    rc, last = rounds[-1]
    installs: list[AptChange] = []
    upgrades: list[AptChange] = []
    removals: list[AptChange] = []
    errors: list[str] = []
    for ln in last:
        m = _INST.match(ln)
        if m:
            change = AptChange(m.group(1), m.group(3) or "", m.group(2) or "")
            (upgrades if m.group(2) else installs).append(change)
            continue
        r = _REMOVE.match(ln)
        if r:
            removals.append(AptChange(r.group(2), "", r.group(3) or ""))
            continue
        if rc != 0 and ln.startswith("E: ") and not any(p.match(ln) for p in _NOT_FOUND):
            errors.append(ln)
    if rc != 0 and not errors and not not_found:
        errors.append(f"apt-get -s exited {rc}")
    return AptSimulation(
        installs=tuple(installs),
        upgrades=tuple(upgrades),
        removals=tuple(removals),
        not_found=tuple(sorted(not_found.items())),
        errors=tuple(errors),
    )


def refused_removals(sim: AptSimulation, allowed: Iterable[str]) -> tuple[AptChange, ...]:
    """The removals apt wants that the fleet does not allow (not purged, not replaced)."""
    ok = set(allowed)
    return tuple(c for c in sim.removals if c.package not in ok and c.package.split(":")[0] not in ok)


async def simulate(conn: Runner, installs: Sequence[str], purges: Sequence[str]) -> AptSimulation:
    """One read-only round trip: ``apt-get -s`` for the whole transaction."""
    from reconciler.kinds.packaging import check_package_name

    names = [check_package_name(n) for n in (*installs, *purges)]
    if not names:
        return AptSimulation()
    framed = await run_framed(conn, SIM_SCRIPT, (str(len(installs)), *names), timeout=SIM_TIMEOUT)
    res = framed.result
    sim = parse_simulation(framed.sections, (res.stderr + res.stdout).decode(errors="replace"))
    log.info(
        "packages.simulated",
        host=getattr(conn, "host", "?"),
        installs=len(sim.installs),
        upgrades=len(sim.upgrades),
        removals=[c.package for c in sim.removals],
        not_found=[p for p, _ in sim.not_found],
    )
    return sim
