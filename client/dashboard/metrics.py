"""The site's ``/metrics``: its privacy ledger, tasks, bytes and refusals (Prometheus)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .state import SiteSource


def _ledger(source: SiteSource) -> Iterator[Any]:
    """ε spent per run and over all runs, against the per-run cap and the budget."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    site = source.site
    report = source.privacy()
    spent = GaugeMetricFamily(
        "wardround_site_epsilon_spent",
        "Epsilon spent over every run, from the ledger (RDP, delta 1e-5)",
    )
    spent.add_metric([], float(report["epsilon_total"]))
    budget = GaugeMetricFamily(
        "wardround_site_epsilon_budget", "The site's lifetime epsilon budget"
    )
    budget.add_metric([], float(site.privacy.budget_epsilon))
    per_run_cap = GaugeMetricFamily(
        "wardround_site_epsilon_max_per_run", "The most epsilon one run may spend"
    )
    per_run_cap.add_metric([], float(site.privacy.max_epsilon))
    per_run = GaugeMetricFamily(
        "wardround_site_run_epsilon", "Epsilon spent by one run", labels=["run"]
    )
    for run, eps in sorted(report["runs"].items()):
        per_run.add_metric([str(run)], float(eps))
    rounds = CounterMetricFamily(
        "wardround_site_dp_rounds", "DP training rounds recorded in the ledger"
    )
    rounds.add_metric([], report["rounds"])
    yield from (spent, budget, per_run_cap, per_run, rounds)


def _tasks(source: SiteSource) -> Iterator[Any]:
    """Tasks run, their wall time and the bytes in and out, from the egress log."""
    from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

    from ..egress_log import read_egress

    tasks = CounterMetricFamily(
        "wardround_site_tasks",
        "Tasks run for the coordinator (failed ones as the egress log records "
        "them: past the tenth of a kind, one in ten)",
        labels=["message_type", "ok"],
    )
    sent = CounterMetricFamily(
        "wardround_site_bytes_sent", "Bytes the site sent in its replies"
    )
    received = CounterMetricFamily(
        "wardround_site_bytes_received", "Bytes of the messages the site received"
    )
    durations = SummaryMetricFamily(
        "wardround_site_task_duration_seconds",
        "Wall time of tasks (training, evaluation, SecAgg+ stages)",
        labels=["message_type"],
    )
    counts: dict[tuple[str, str], int] = {}
    times: dict[str, list[float]] = {}
    total_out = total_in = 0
    for row in read_egress(source.egress_path):
        kind = str(row.get("message_type", ""))
        key = (kind, "true" if row.get("ok") else "false")
        counts[key] = counts.get(key, 0) + 1
        times.setdefault(kind, []).append(float(row.get("seconds") or 0.0))
        total_out += int(row.get("bytes_out") or 0)
        total_in += int(row.get("bytes_in") or 0)
    for (kind, ok), count in sorted(counts.items()):
        tasks.add_metric([kind, ok], count)
    for kind, values in sorted(times.items()):
        durations.add_metric([kind], count_value=len(values), sum_value=sum(values))
    sent.add_metric([], total_out)
    received.add_metric([], total_in)
    yield from (tasks, sent, received, durations)


def _refusals(source: SiteSource) -> Any:
    """Unapproved apps and refused answers, from the site's audit log."""
    from prometheus_client.core import CounterMetricFamily

    from ...ops.audit import read_audit

    refusals = CounterMetricFamily(
        "wardround_site_refusals",
        "Tasks or answers the site refused (unapproved app, policy), as the audit "
        "log records them: past the tenth of a kind, one line in ten",
        labels=["event"],
    )
    refused: dict[str, int] = {"app_refused": 0, "answer_refused": 0}
    if source.audit_path.is_file():
        for entry in read_audit(source.audit_path):
            if entry.get("event") in refused:
                refused[entry["event"]] += 1
    for event, count in refused.items():
        refusals.add_metric([event], count)
    return refusals


class SiteCollector:
    """A ``prometheus_client`` collector over a :class:`SiteSource`, read at scrape time."""

    def __init__(self, source: SiteSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        """The metric families, fresh from the files."""
        yield from _ledger(self.source)
        yield from _tasks(self.source)
        yield _refusals(self.source)


def metrics_text(source: SiteSource) -> bytes:
    """The Prometheus text exposition of the site's metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(source))
    return generate_latest(registry)
