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
    tasks_seen = source.egress_tally().total()
    for (kind, ok), count in sorted(tasks_seen.counts.items()):
        tasks.add_metric([kind, ok], count)
    for kind, (count, seconds) in sorted(tasks_seen.durations.items()):
        durations.add_metric([kind], count_value=count, sum_value=seconds)
    sent.add_metric([], tasks_seen.bytes_out)
    received.add_metric([], tasks_seen.bytes_in)
    yield from (tasks, sent, received, durations)


def _refusals(source: SiteSource) -> Any:
    """Unapproved apps and refused answers, from the site's audit log."""
    from prometheus_client.core import CounterMetricFamily

    refusals = CounterMetricFamily(
        "wardround_site_refusals",
        "Tasks or answers the site refused (unapproved app, policy), as the audit "
        "log records them: past the tenth of a kind, one line in ten",
        labels=["event"],
    )
    refused = source.refusal_tally().total()
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
