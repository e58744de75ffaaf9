"""The daemon's Prometheus metrics, on the standard client library (``prometheus_client``).

Each ``DaemonMetrics`` has its own ``CollectorRegistry`` (two daemons in one test process do not
share counters). Labels stay low-cardinality: a result, a reason, a queue, a phase, a host; never
a file path, a commit or a secret. Gauges that mirror live state (hosts by state, queue depth,
the outbox) are computed at scrape time from callbacks. The exposition is the text format 0.0.4
(``CONTENT_TYPE``), checked in tests with the client's own parser and ``promtool check metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _PCounter
from prometheus_client import Gauge as _PGauge
from prometheus_client import Histogram as _PHistogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The *_created samples double every counter for no use here (and promtool counts them as series).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PHASES = ("drift_scan", "engine", "verify")  # the phases of one host's reconcile, timed apart

LabelValues = tuple[str, ...]
Samples = Callable[[], Iterable[tuple[LabelValues, float]]]


class Counter:
    """A counter with positional label values: ``inc(amount, *labels)``."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()):
        base = name.removesuffix("_total")
        self._metric = _PCounter(base, help_text, tuple(labels), registry=registry)
        self._labelled = bool(labels)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        (self._metric.labels(*labels) if self._labelled else self._metric).inc(amount)

    def value(self, *labels: str) -> float:
        child = self._metric.labels(*labels) if self._labelled else self._metric
        return float(child._value.get())


class Gauge:
    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()):
        self._metric = _PGauge(name, help_text, tuple(labels), registry=registry)
        self._labelled = bool(labels)

    def set(self, value: float, *labels: str) -> None:
        (self._metric.labels(*labels) if self._labelled else self._metric).set(value)

    def value(self, *labels: str) -> float:
        child = self._metric.labels(*labels) if self._labelled else self._metric
        return float(child._value.get())


class Histogram:
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ):
        self._metric = _PHistogram(name, help_text, tuple(labels), registry=registry, buckets=tuple(buckets))
        self._labelled = bool(labels)

    def observe(self, value: float, *labels: str) -> None:
        (self._metric.labels(*labels) if self._labelled else self._metric).observe(value)

    def count(self, *labels: str) -> int:
        for metric in self._metric.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count") and tuple(sample.labels.values()) == labels:
                    return int(sample.value)
        return 0


class _LiveGauge(Collector):
    """A gauge family computed at scrape time."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], samples: Samples) -> None:
        self._name, self._help, self._labels, self._samples = name, help_text, list(labels), samples

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._help, labels=self._labels)
        for values, value in sorted(self._samples()):
            family.add_metric([str(v) for v in values], float(value))
        yield family

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._help, labels=self._labels)


class DaemonMetrics:
    """The daemon's metrics; gauges that mirror live state take a collect callback."""

    def __init__(
        self,
        *,
        host_states: Samples = lambda: (),
        queue_depth: Samples = lambda: (),
        in_flight: Samples = lambda: (),
        outbox: Samples = lambda: (),
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.reconcile_duration = Histogram(
            r, "reconciler_reconcile_duration_seconds", "Time to reconcile one host.", ("result",)
        )
        self.phase_duration = Histogram(
            r,
            "reconciler_phase_duration_seconds",
            "Time spent in one phase of a host's reconcile (drift_scan, engine, verify).",
            ("phase",),
        )
        self.reconciles = Counter(r, "reconciler_reconciles_total", "Host reconciles by result.", ("result",))
        r.register(
            _LiveGauge(
                "reconciler_hosts",
                "Hosts by state (Ready, Reconciling, Stalled, Retrying, Removed, Unknown).",
                ("state",),
                host_states,
            )
        )
        self.host_failures = Counter(
            r,
            "reconciler_host_failures_total",
            "Failed host reconciles by typed reason and class (terminal: stalled; transient: retried).",
            ("reason", "class"),
        )
        self.stalls = Counter(
            r,
            "reconciler_stalls_total",
            "Hosts stalled on a commit by a terminal failure, by reason (each is mailed once).",
            ("reason",),
        )
        self.drift = Counter(
            r,
            "reconciler_drift_total",
            "Drifted paths found per host (hand edits, never our own).",
            ("host",),
        )
        self.drift_events = Counter(
            r, "reconciler_drift_events_total", "Drift scans that found hand edits, per host.", ("host",)
        )
        self.applied_changes = Counter(
            r, "reconciler_applied_changes_total", "Changes the fleet made on a host (not drift).", ("host",)
        )
        self.last_apply = Gauge(
            r,
            "reconciler_last_successful_apply_timestamp_seconds",
            "Unix time of the last reconcile of a host that ended in sync with the fleet.",
            ("host",),
        )
        self.drift_scans = Counter(r, "reconciler_drift_scans_total", "Drift scans run.")
        r.register(
            _LiveGauge("reconciler_queue_depth", "Work items waiting (per queue).", ("queue",), queue_depth)
        )
        r.register(
            _LiveGauge(
                "reconciler_in_flight", "Work items being processed (per queue).", ("queue",), in_flight
            )
        )
        r.register(
            _LiveGauge(
                "reconciler_mail_outbox",
                "Mail in the durable outbox by status (pending, sent).",
                ("status",),
                outbox,
            )
        )
        r.register(
            _LiveGauge(
                "reconciler_mail_outbox_pending",
                "Mails waiting in the outbox to be delivered.",
                (),
                lambda: [((), v) for k, v in outbox() if k == ("pending",)] or [((), 0.0)],
            )
        )
        self.fetches = Counter(
            r, "reconciler_source_fetches_total", "Fleet repo fetches by result.", ("result",)
        )
        self.rejected = Counter(
            r, "reconciler_source_rejected_commits_total", "Commits refused (unsigned, invalid).", ("reason",)
        )
        self.webhooks = Counter(
            r,
            "reconciler_webhook_requests_total",
            "Webhook deliveries by provider and result.",
            ("provider", "result"),
        )
        self.push_to_converged = Histogram(
            r,
            "reconciler_commit_to_converged_seconds",
            "From the first fetch that saw a commit until every host is Ready on it.",
        )
        self.verify_runs = Counter(
            r, "reconciler_verify_runs_total", "Live verifications after an apply, by result.", ("result",)
        )
        self.verify_checks = Gauge(
            r,
            "reconciler_verify_checks",
            "Live checks at a host's last verify after an apply, by status (pass, fail, skip).",
            ("host", "status"),
        )

    def render(self) -> str:
        return generate_latest(self.registry).decode()
