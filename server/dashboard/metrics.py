"""The coordinator's ``/metrics``: Prometheus text, computed from its files at scrape time.

Every value is read when Prometheus scrapes, from the same sources as the pages
(:mod:`.state`), through a custom collector on a private registry: no global
state, nothing counted twice across a coordinator restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .state import CoordinatorSource, RunView, privacy_rows


def _runs_by_state(runs: list[RunView]) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    by_state = GaugeMetricFamily("wardround_runs", "Runs by state", labels=["state"])
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    for state, count in sorted(counts.items()):
        by_state.add_metric([state], count)
    return by_state


def _progress(runs: list[RunView]) -> Iterator[Any]:
    """Rounds completed and planned, and the training rounds' durations, per run."""
    from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

    done = GaugeMetricFamily(
        "wardround_run_rounds_completed", "Rounds completed", labels=["run"]
    )
    planned = GaugeMetricFamily(
        "wardround_run_rounds_planned", "Rounds planned", labels=["run"]
    )
    durations = SummaryMetricFamily(
        "wardround_round_duration_seconds",
        "Wall time of the run's training rounds",
        labels=["run"],
    )
    for run in runs:
        done.add_metric([run.name], run.rounds_done)
        if run.rounds_planned is not None:
            planned.add_metric([run.name], run.rounds_planned)
        training = [r for r in run.rounds if r["round"] > 0]
        durations.add_metric(
            [run.name],
            count_value=len(training),
            sum_value=sum(float(r.get("seconds") or 0.0) for r in training),
        )
    yield from (done, planned, durations)


def _traffic(runs: list[RunView]) -> Iterator[Any]:
    """Bytes each site sent, and the rounds a site did not take part in usefully."""
    from prometheus_client.core import CounterMetricFamily

    sent = CounterMetricFamily(
        "wardround_site_bytes_sent",
        "Bytes each site sent to the coordinator (adapter updates)",
        labels=["run", "site"],
    )
    refusals = CounterMetricFamily(
        "wardround_site_refusals",
        "Rounds in which a site did not take part usefully (refused or failed)",
        labels=["run", "node_id", "kind"],
    )
    for run in runs:
        totals: dict[str, float] = {}
        refused: dict[tuple[str, str], int] = {}
        for row in run.rounds:
            for report in row.get("train", []):
                site = str(report["site"])
                totals[site] = totals.get(site, 0.0) + float(
                    report.get("bytes_sent") or 0
                )
            for failure in row.get("failures", []):
                key = (str(failure.get("node_id")), str(failure.get("kind") or ""))
                refused[key] = refused.get(key, 0) + 1
        for site, total in sorted(totals.items()):
            sent.add_metric([run.name, site], total)
        for (node, kind), count in sorted(refused.items()):
            refusals.add_metric([run.name, node, kind], count)
    yield from (sent, refusals)


def _privacy(runs: list[RunView]) -> Iterator[Any]:
    """ε each site reported, per run and over its lifetime, against target and budget."""
    from prometheus_client.core import GaugeMetricFamily

    families = {
        "epsilon_run": GaugeMetricFamily(
            "wardround_site_epsilon_run",
            "Epsilon the run has spent at the site, as the site reported it",
            labels=["run", "site"],
        ),
        "epsilon_total": GaugeMetricFamily(
            "wardround_site_reported_epsilon_lifetime",
            "Epsilon over every run in the site's ledger, as the site reported it",
            labels=["run", "site"],
        ),
        "epsilon_budget": GaugeMetricFamily(
            "wardround_site_reported_epsilon_budget",
            "The site's lifetime epsilon budget, as the site reported it",
            labels=["run", "site"],
        ),
    }
    target = GaugeMetricFamily(
        "wardround_run_target_epsilon", "The run's target epsilon", labels=["run"]
    )
    for run in runs:
        if run.target_epsilon is not None and run.dp_enabled:
            target.add_metric([run.name], float(run.target_epsilon))
        for row in privacy_rows(run):
            for key, family in families.items():
                if row[key] is not None:
                    family.add_metric([run.name, row["site"]], float(row[key]))
    yield from (*families.values(), target)


def _sites(source: CoordinatorSource) -> Iterator[Any]:
    """Sites enrolled, online, and the release each one states."""
    from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

    sites = source.sites()
    enrolled = GaugeMetricFamily(
        "wardround_sites_enrolled", "Sites enrolled and not revoked"
    )
    enrolled.add_metric(
        [], sum(1 for s in sites if s["enrolled_at"] and not s["revoked_at"])
    )
    yield enrolled
    release = InfoMetricFamily(
        "wardround_site_release",
        "The wardround release a site stated in its newest reply",
        labels=["site"],
    )
    for site in sites:
        if site["attributed"] and site["software_version"]:
            release.add_metric([site["site"]], {"version": site["software_version"]})
    yield release
    if source.site_status is None:
        return
    online = GaugeMetricFamily(
        "wardround_sites_online", "Enrolled sites the SuperLink sees online"
    )
    online.add_metric([], sum(1 for s in sites if s["state"] == "online"))
    yield online
    up = GaugeMetricFamily(
        "wardround_site_online", "1 when the site is online", labels=["site"]
    )
    for site in sites:
        if site["enrolled_at"]:
            up.add_metric([site["site"]], 1.0 if site["state"] == "online" else 0.0)
    yield up


class CoordinatorCollector:
    """A ``prometheus_client`` collector over a :class:`CoordinatorSource`."""

    def __init__(self, source: CoordinatorSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        """The metric families, fresh from the files."""
        runs = self.source.runs()
        yield _runs_by_state(runs)
        yield from _progress(runs)
        yield from _traffic(runs)
        yield from _privacy(runs)
        yield from _sites(self.source)


def metrics_text(source: CoordinatorSource) -> bytes:
    """The Prometheus text exposition of the coordinator's metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(source))
    return generate_latest(registry)
