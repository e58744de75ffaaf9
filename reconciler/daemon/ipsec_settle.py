"""Start again the mesh pairs that the verify after apply found down (libipsec datapath).

With libipsec there are no trap policies: exactly one side of a pair starts its CHILD_SA (the
host whose name sorts first, ``domains.strongswan.initiates``), and charon does not try again when
that first attempt met a peer that had not loaded its side yet. That is what a keys push does to
a fleet: each host applies in turn, so a pair whose initiator applied before its responder stays
down (measured: 79 of 600 pairs at 300 hosts) until something reconciles the initiator again.

The verify after apply runs once the push has settled (``daemon.after_apply``), so both sides are
loaded by then. For each pair it found down, the pair's initiator is reconciled again (when this
replica owns it) after a short delay: its plan re-initiates the child that is not up
(``kinds.ipsec.plan_initiate``) and that apply is verified in turn. At most ``attempts`` times per
host and commit, each later than the one before: a pair that stays down (a peer that is really
broken) is left to the verify report and the next reconcile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.domains.strongswan import initiates
from reconciler.fleet.model import Datapath, Fleet
from reconciler.log import get_logger

log = get_logger(__name__)

PAIR_CHECKS = frozenset({"ipsec.ike", "ipsec.child"})
REASON = "ipsec-settle"


def initiators_of_down_pairs(fleet: Fleet, host: str, checks: Iterable[Mapping[str, object]]) -> set[str]:
    """The hosts that start the pairs ``checks`` (one host's verify checks) show down: only with
    the libipsec datapath (the kernel's trap policies start a pair on their own)."""
    if fleet.mesh.datapath is not Datapath.LIBIPSEC:
        return set()
    names = set(fleet.host_names())
    out: set[str] = set()
    for check in checks:
        peer = check.get("peer")
        if check.get("name") not in PAIR_CHECKS or check.get("status") != "fail":
            continue
        if not isinstance(peer, str) or peer not in names or host not in names:
            continue
        a, b = fleet.host(host), fleet.host(peer)
        out.add(host if initiates(a, b) else peer)
    return out


@dataclass
class PairSettler:
    """Schedules the initiators' extra reconciles; ``request`` queues a forced reconcile of one
    host (the loop ignores a host this replica does not own)."""

    request: Callable[[str], object]
    attempts: int = 3
    delay: float = 2.0
    _tries: dict[tuple[str, str], int] = field(default_factory=dict)
    _timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _reporters: dict[str, set[str]] = field(default_factory=dict)  # initiator -> hosts that saw it down

    def on_verified(
        self, fleet: Fleet, commit: str, host: str, checks: Iterable[Mapping[str, object]]
    ) -> list[str]:
        """``host`` was verified on ``commit``; returns the initiators scheduled again."""
        self._tries = {k: n for k, n in self._tries.items() if k[1] == commit}  # older commits: done
        scheduled = []
        for initiator in sorted(initiators_of_down_pairs(fleet, host, checks)):
            self._reporters.setdefault(initiator, set()).add(host)
            key = (initiator, commit)
            tries = self._tries.get(key, 0)
            if tries >= self.attempts or initiator in self._timers:
                continue
            self._tries[key] = tries + 1
            delay = self.delay * (tries + 1)
            self._timers[initiator] = asyncio.get_running_loop().call_later(delay, self._fire, initiator)
            scheduled.append(initiator)
            log.info("mesh pair down after apply: its initiator starts it again", host=initiator,
                     verified=host, attempt=tries + 1, in_seconds=delay)  # fmt: skip
        return scheduled

    def reverify(self, initiator: str) -> set[str]:
        """The hosts to verify again after ``initiator``'s extra reconcile, whether or not it
        changed anything (the pair may have come up meanwhile): itself and the hosts whose
        verify showed its pairs down (their records show the pair too)."""
        return {initiator} | self._reporters.pop(initiator, set())

    def _fire(self, host: str) -> None:
        self._timers.pop(host, None)
        self.request(host)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._reporters.clear()
