"""/metrics on prometheus_client: the exposition parses with the client's own parser, passes
``promtool check metrics`` (Debian's prometheus package, installed by scripts/install.sh), keeps
the metric names the dashboards use, and a hostile label value cannot forge a sample."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.daemon.metrics import CONTENT_TYPE, DaemonMetrics

NAMES = {
    "reconciler_reconcile_duration_seconds",
    "reconciler_phase_duration_seconds",
    "reconciler_reconciles",
    "reconciler_hosts",
    "reconciler_host_failures",
    "reconciler_stalls",
    "reconciler_drift",
    "reconciler_drift_events",
    "reconciler_applied_changes",
    "reconciler_last_successful_apply_timestamp_seconds",
    "reconciler_drift_scans",
    "reconciler_queue_depth",
    "reconciler_in_flight",
    "reconciler_mail_outbox",
    "reconciler_mail_outbox_pending",
    "reconciler_source_fetches",
    "reconciler_source_rejected_commits",
    "reconciler_webhook_requests",
    "reconciler_commit_to_converged_seconds",
    "reconciler_verify_runs",
    "reconciler_verify_checks",
}


def busy_metrics() -> DaemonMetrics:
    m = DaemonMetrics(
        host_states=lambda: [(("Ready",), 3.0), (("Stalled",), 1.0)],
        queue_depth=lambda: [(("hosts",), 2.0), (("source",), 0.0)],
        in_flight=lambda: [(("hosts",), 1.0)],
        outbox=lambda: [(("pending",), 4.0), (("sent",), 9.0)],
    )
    m.reconcile_duration.observe(0.3, "ok")
    for phase, secs in (("drift_scan", 0.2), ("engine", 0.4), ("verify", 1.5)):
        m.phase_duration.observe(secs, phase)
    m.reconciles.inc(1, "ok")
    m.drift.inc(2, "web1")
    m.drift_events.inc(1, "web1")
    m.applied_changes.inc(14, "web1")
    m.last_apply.set(1_700_000_000.5, "web1")
    m.drift_scans.inc()
    m.webhooks.inc(1, "github", 'evil"} 666\nreconciler_hosts{state="Ready"} 1e9')
    m.push_to_converged.observe(3.2)
    m.verify_checks.set(12, "web1", "pass")
    return m


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_parses_and_keeps_the_names() -> None:
    text = busy_metrics().render()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert NAMES <= families, NAMES - families
    got = samples(text)
    assert got[("reconciler_hosts", (("state", "Ready"),))] == 3.0  # not the forged 1e9
    assert got[("reconciler_queue_depth", (("queue", "hosts"),))] == 2.0
    assert got[("reconciler_mail_outbox_pending", ())] == 4.0
    assert got[("reconciler_phase_duration_seconds_count", (("phase", "verify"),))] == 1.0
    assert got[("reconciler_last_successful_apply_timestamp_seconds", (("host", "web1"),))] == 1_700_000_000.5
    assert got[("reconciler_drift_events_total", (("host", "web1"),))] == 1.0
    assert got[("reconciler_applied_changes_total", (("host", "web1"),))] == 14.0
    assert not any(name.endswith("_created") for name, _ in got)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_two_daemons_do_not_share_counters() -> None:
    a, b = DaemonMetrics(), DaemonMetrics()
    a.reconciles.inc(1, "ok")
    assert a.reconciles.value("ok") == 1.0 and b.reconciles.value("ok") == 0.0


def test_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/install.sh installs it)")
    res = subprocess.run([promtool, "check", "metrics"], input=busy_metrics().render(), text=True,
                         capture_output=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
