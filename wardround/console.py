"""Terminal output: a per-round progress display and the end-of-run summary."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from wardround.common.config import personalised_in
from wardround.server.federation import FederationResult
from wardround.server.records import RoundRecord


def _fmt(value: float, digits: int = 3) -> str:
    return (
        f"{value:.{digits}f}"
        if isinstance(value, (int, float)) and math.isfinite(value)
        else "—"
    )


class ProgressObserver:
    """A rich progress bar over rounds; silent when stdout is not a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def on_start(self, total_rounds: int) -> None:
        """Open the progress bar."""
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "rounds", total=total_rounds, status="training…"
        )

    def on_round(self, record: RoundRecord) -> None:
        """Advance by one round and show its global AUROC."""
        if self.progress is None or self.task is None:
            return
        score = (
            f"perplexity {_fmt(record.extra['generative']['eval-perplexity'], 2)}"
            if "generative" in record.extra
            else f"AUROC {_fmt(record.global_auroc)}"
        )
        self.progress.update(
            self.task,
            advance=1,
            status=f"round {record.round}: {score} loss {_fmt(record.global_loss, 4)}",
        )

    def close(self) -> None:
        """Stop the progress bar."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _title(summary: dict) -> str:
    aggregation = " + ".join(
        "SecAgg+" if a == "secagg+" else a for a in summary["aggregation"]
    )
    dp = summary["differential_privacy"]
    privacy = (
        f"DP-SGD (target ε={dp['target-epsilon']:g}, δ={dp['target-delta']:g})"
        if dp
        else "no DP"
    )
    return (
        f"wardround: {summary['rounds_completed']} round(s), {aggregation} "
        f"aggregation, {privacy}"
    )


def _caption(with_privacy: bool, generative: bool = False) -> str:
    text = (
        "val n: validation examples, as each site reports them (rounded up to its "
        "count-granularity); r0: before training; ppl: perplexity"
        if generative
        else "val n: validation studies, as each site reports them (rounded up to "
        "its count-granularity); AUROC r0: before training"
    )
    if with_privacy:
        text += "; ε run / ε all: spent by this run / by all runs (RDP)"
    return text


def summary_table(result: FederationResult) -> Table:
    """Per-site and global AUROC, loss, epsilon spent and bytes sent."""
    last = result.rounds[-1]
    first = result.rounds[0]
    # A generative (vlm) run has no AUROC: its first two score columns are the
    # untrained loss and the final perplexity.
    generative = "generative" in last.extra
    if generative:
        first_score = {e.site: e.loss for e in first.evaluate}
        first_global = first.global_loss
        names = (f"loss r{first.round}", f"ppl r{last.round}")

        def final(e: Any) -> float:
            return e.metrics.get("eval-perplexity", float("nan"))

        final_global = last.extra["generative"].get("eval-perplexity", float("nan"))
    else:
        first_score = {e.site: e.auroc_macro for e in first.evaluate}
        first_global = first.global_auroc
        names = (f"AUROC r{first.round}", f"AUROC r{last.round}")

        def final(e: Any) -> float:
            return e.auroc_macro

        final_global = last.global_auroc
    sent = result.summary["bytes_sent_per_site"]
    spent = result.summary["privacy_spent"]
    # each site scores a model of its own: the last row is their mean, no one model's
    personalised = personalised_in(
        result.summary.get("config", {}).get("federation", {})
    )
    caption = _caption(bool(spent), generative)
    if personalised:
        caption += (
            "; personalised sites: each scores a model of its own, and 'all sites' "
            "is their weighted mean"
        )
    table = Table(title=_title(result.summary), caption=caption)
    # Short headers: the table fits an 80-column terminal (and CI logs).
    columns = ["site", "val n", *names, "val loss"]
    if spent:
        columns += ["ε run", "ε all"]
    columns.append("bytes sent")
    for col in columns:
        table.add_column(col, justify="right" if col != "site" else "left")
    for e in last.evaluate:
        privacy = (
            [
                _fmt(spent[e.site]["epsilon_run"], 2) if e.site in spent else "—",
                _fmt(spent[e.site]["epsilon_total"], 2) if e.site in spent else "—",
            ]
            if spent
            else []
        )
        table.add_row(
            e.site,
            str(e.num_examples),
            _fmt(first_score.get(e.site, float("nan")), 4 if generative else 3),
            _fmt(final(e), 2 if generative else 3),
            _fmt(e.loss, 4),
            *privacy,
            f"{sent.get(e.site, 0):,}",
        )
    table.add_row(
        "[bold]all sites" if personalised else "[bold]global",
        str(sum(e.num_examples for e in last.evaluate)),
        _fmt(first_global, 4 if generative else 3),
        f"[bold]{_fmt(final_global, 2 if generative else 3)}",
        _fmt(last.global_loss, 4),
        *(["", ""] if spent else []),
        f"{sum(sent.values()):,}",
    )
    return table
