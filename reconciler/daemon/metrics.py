"""A small Prometheus registry rendered in the text exposition format (version 0.0.4).

prometheus_client is not a dependency; counters, gauges and histograms with labels are all the
daemon needs. Label values are escaped as the format requires. Never put a secret in a label.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}")
        return tuple(str(v) for v in labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        collect: Callable[[], Iterable[tuple[LabelValues, float]]] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}
        self._collect = collect  # computed at scrape time (e.g. queue depth, host states)

    def set(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        if self._collect is not None:
            items = sorted((self._key(k), float(v)) for k, v in self._collect())
        else:
            with self._lock:
                items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, *labels: str) -> int:
        counts = self._counts.get(self._key(labels))
        return counts[-1] if counts else 0

    def samples(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for key, counts, total in items:
            for bound, n in zip(self.buckets, counts, strict=True):
                le = _labels(self.labelnames, key, ("le", _fmt(bound)))
                out.append(f"{self.name}_bucket{le} {n}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {counts[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


class DaemonMetrics:
    """The daemon's metrics; gauges that mirror live state take a collect callback."""

    def __init__(
        self,
        *,
        host_states: Callable[[], Iterable[tuple[LabelValues, float]]] = lambda: (),
        queue_depth: Callable[[], Iterable[tuple[LabelValues, float]]] = lambda: (),
        in_flight: Callable[[], Iterable[tuple[LabelValues, float]]] = lambda: (),
        outbox: Callable[[], Iterable[tuple[LabelValues, float]]] = lambda: (),
    ) -> None:
        self.registry = Registry()
        self.reconcile_duration = Histogram(
            "reconciler_reconcile_duration_seconds", "Time to reconcile one host.", ("result",)
        )
        self.reconciles = Counter("reconciler_reconciles_total", "Host reconciles by result.", ("result",))
        self.host_states = Gauge(
            "reconciler_hosts",
            "Hosts by state (Ready, Reconciling, Stalled, Retrying, Removed, Unknown).",
            ("state",),
            collect=host_states,
        )
        self.host_failures = Counter(
            "reconciler_host_failures_total",
            "Failed host reconciles by typed reason and class (terminal: stalled; transient: retried).",
            ("reason", "class"),
        )
        self.stalls = Counter(
            "reconciler_stalls_total",
            "Hosts stalled on a commit by a terminal failure, by reason (each is mailed once).",
            ("reason",),
        )
        self.drift = Counter("reconciler_drift_total", "Drift findings per host.", ("host",))
        self.drift_scans = Counter("reconciler_drift_scans_total", "Drift scans run.")
        self.queue_depth = Gauge(
            "reconciler_queue_depth", "Work items waiting (per queue).", ("queue",), collect=queue_depth
        )
        self.in_flight = Gauge(
            "reconciler_in_flight", "Work items being processed (per queue).", ("queue",), collect=in_flight
        )
        self.outbox = Gauge(
            "reconciler_mail_outbox",
            "Mail in the durable outbox by status (pending, sent).",
            ("status",),
            collect=outbox,
        )
        self.fetches = Counter(
            "reconciler_source_fetches_total", "Fleet repo fetches by result.", ("result",)
        )
        self.rejected = Counter(
            "reconciler_source_rejected_commits_total", "Commits refused (unsigned, invalid).", ("reason",)
        )
        self.webhooks = Counter(
            "reconciler_webhook_requests_total",
            "Webhook deliveries by provider and result.",
            ("provider", "result"),
        )
        self.push_to_converged = Histogram(
            "reconciler_commit_to_converged_seconds",
            "From the first fetch that saw a commit until every host is Ready on it.",
        )
        self.verify_runs = Counter(
            "reconciler_verify_runs_total", "Live verifications after an apply, by result.", ("result",)
        )
        self.verify_checks = Gauge(
            "reconciler_verify_checks",
            "Live checks at a host's last verify after an apply, by status (pass, fail, skip).",
            ("host", "status"),
        )
        for metric in (
            self.verify_runs,
            self.verify_checks,
            self.reconcile_duration,
            self.reconciles,
            self.host_failures,
            self.stalls,
            self.host_states,
            self.drift,
            self.drift_scans,
            self.queue_depth,
            self.in_flight,
            self.outbox,
            self.fetches,
            self.rejected,
            self.webhooks,
            self.push_to_converged,
        ):
            self.registry.register(metric)

    def render(self) -> str:
        return self.registry.render()
