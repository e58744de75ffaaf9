"""The check model: one ``Check`` per thing verified, and the ``VerifyReport`` of a run.

A check belongs to a host and, for mesh checks, to a peer (``peer == ""`` for host-level
checks such as "charon runs" or "Apache answers"). Its status is ``pass``, ``fail`` or
``skip``; a skip always says why (e.g. this kernel has no ESP), and is never counted as a pass.
``evidence`` says what was seen; ``cause`` says why a check failed or was skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a status, not a password
    FAIL = "fail"
    SKIP = "skip"


def _details(data: Mapping[str, object] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(data or {}))


@dataclass(frozen=True)
class Check:
    host: str
    peer: str  # "" for a host-level check
    name: str  # e.g. "ipsec.child", "datapath", "apache.shop"
    status: Status
    evidence: str = ""
    cause: str = ""  # why it failed or was skipped ("" when it passed)
    details: Mapping[str, object] = field(default_factory=lambda: _details(None), compare=False)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "host": self.host,
            "peer": self.peer or None,
            "name": self.name,
            "status": self.status.value,
            "evidence": self.evidence,
        }
        if self.cause:
            out["cause"] = self.cause
        if self.details:
            out["details"] = dict(self.details)
        return out


def passed(
    host: str, peer: str, name: str, evidence: str, details: Mapping[str, object] | None = None
) -> Check:
    return Check(host, peer, name, Status.PASS, evidence, "", _details(details))


Details = Mapping[str, object] | None


def failed(host: str, peer: str, name: str, cause: str, evidence: str = "", details: Details = None) -> Check:
    return Check(host, peer, name, Status.FAIL, evidence, cause, _details(details))


def skipped(
    host: str, peer: str, name: str, reason: str, evidence: str = "", details: Details = None
) -> Check:
    """Not run or not conclusive: ``reason`` says why (in the cause field)."""
    return Check(host, peer, name, Status.SKIP, evidence, reason, _details(details))


@dataclass(frozen=True)
class VerifyReport:
    """Every check of one verify run, sorted by host, peer, name."""

    checks: tuple[Check, ...]
    hosts: tuple[str, ...]  # the hosts verified
    pairs: tuple[tuple[str, str], ...]  # the ordered (host, peer) pairs verified
    seconds: float = 0.0
    finished_at: float = 0.0  # time.time() when the run ended

    @staticmethod
    def build(
        checks: Iterable[Check],
        hosts: Iterable[str],
        pairs: Iterable[tuple[str, str]],
        *,
        seconds: float = 0.0,
        finished_at: float = 0.0,
    ) -> VerifyReport:
        return VerifyReport(
            checks=tuple(sorted(checks, key=lambda c: (c.host, c.peer, c.name))),
            hosts=tuple(hosts),
            pairs=tuple(pairs),
            seconds=seconds,
            finished_at=finished_at,
        )

    @property
    def ok(self) -> bool:
        """True when no check that ran failed (skips do not count either way)."""
        return not any(c.status is Status.FAIL for c in self.checks)

    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for c in self.checks:
            out[c.status.value] += 1
        return out

    def for_host(self, host: str) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.host == host)

    def for_pair(self, host: str, peer: str) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.host == host and c.peer == peer)

    def get(self, host: str, peer: str, name: str) -> Check:
        for c in self.checks:
            if (c.host, c.peer, c.name) == (host, peer, name):
                return c
        raise KeyError((host, peer, name))

    def failed_pairs(self) -> set[tuple[str, str]]:
        return {(c.host, c.peer) for c in self.checks if c.peer and c.status is Status.FAIL}

    def failed_hosts(self) -> set[str]:
        return {c.host for c in self.checks if c.status is Status.FAIL}

    def metrics(self) -> dict[str, float]:
        """Flat Prometheus-style samples (name -> value) for the daemon's /metrics.

        Per-host samples carry the host as a label inside the name, e.g.
        ``reconciler_verify_host_failed_checks{host="web1"}``.
        """
        counts = self.counts()
        failed_pairs = self.failed_pairs()
        out: dict[str, float] = {
            "reconciler_verify_ok": 1.0 if self.ok else 0.0,
            "reconciler_verify_checks_passed": float(counts["pass"]),
            "reconciler_verify_checks_failed": float(counts["fail"]),
            "reconciler_verify_checks_skipped": float(counts["skip"]),
            "reconciler_verify_pairs": float(len(self.pairs)),
            "reconciler_verify_pairs_failed": float(len([p for p in self.pairs if p in failed_pairs])),
            "reconciler_verify_duration_seconds": round(self.seconds, 3),
            "reconciler_verify_last_run_timestamp_seconds": round(self.finished_at, 3),
        }
        for host in self.hosts:
            n = sum(1 for c in self.checks if c.host == host and c.status is Status.FAIL)
            out[f'reconciler_verify_host_failed_checks{{host="{host}"}}'] = float(n)
        return out

    def as_dict(self) -> dict[str, object]:
        failed_pairs = self.failed_pairs()
        return {
            "ok": self.ok,
            "exit_code": self.exit_code(),
            "seconds": round(self.seconds, 3),
            "finished_at": self.finished_at,
            "counts": self.counts(),
            "hosts": list(self.hosts),
            "pairs": [{"host": h, "peer": p, "ok": (h, p) not in failed_pairs} for h, p in self.pairs],
            "checks": [c.as_dict() for c in self.checks],
        }
