from pathlib import Path

from rich.console import Console

from wardround.console import summary_table
from wardround.server.federation import FederationResult
from wardround.server.records import RoundRecord, SiteEvalReport


def _round(n, auroc):
    evals = [
        SiteEvalReport(1, "site-01", 10, 0.5, auroc, {}),
        SiteEvalReport(2, "site-02", 30, 0.4, auroc + 0.1, {}),
    ]
    return RoundRecord(n, [], evals, [], auroc + 0.075, 0.45, 0.5, "sha", 1.0, 0.0)


def test_summary_counts_training_rounds_and_shows_every_site():
    result = FederationResult(
        Path("."),
        [_round(0, 0.5), _round(1, 0.6), _round(2, 0.7)],
        {
            "aggregation": ["secagg+"],
            "rounds_completed": 2,
            "differential_privacy": {"target-epsilon": 8.0, "target-delta": 1e-5},
            "privacy_spent": {
                "site-01": {"epsilon_run": 3.21, "epsilon_total": 11.5},
                "site-02": {"epsilon_run": 3.4, "epsilon_total": 3.4},
            },
            "bytes_sent_per_site": {"site-01": 100, "site-02": 200},
        },
    )
    console = Console(record=True, width=120)
    console.print(summary_table(result))
    text = console.export_text()
    assert "2 round(s)" in text
    assert "AUROC r0" in text and "AUROC r2" in text
    assert "site-01" in text and "site-02" in text and "0.775" in text
    assert "300" in text  # bytes summed over sites
    assert "SecAgg+" in text and "ε=8" in text
    assert "3.21" in text and "11.50" in text  # epsilon per site: this run, all runs


def test_personalised_sites_mean_is_not_called_a_global_models():
    summary = {
        "aggregation": ["plain"],
        "rounds_completed": 1,
        "differential_privacy": None,
        "privacy_spent": {},
        "bytes_sent_per_site": {"site-01": 100, "site-02": 200},
        "config": {"federation": {"personal": [], "own-model-weight": 0.5}},
    }
    result = FederationResult(Path("."), [_round(0, 0.5), _round(1, 0.6)], summary)
    console = Console(record=True, width=200)
    console.print(summary_table(result))
    text = console.export_text()
    assert "all sites" in text and "weighted mean" in text
    assert "global" not in text
