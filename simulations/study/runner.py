"""The learning-quality study: every arm on every federation and seed, then a report.

The output folder holds, per size, seed and site count, the synthetic hospitals
(``data/patients-P/seed-S/sites-N/``, shared by every base) and, per arm, its
result (``arms/patients-P/sites-N/base-B/seed-S/ARM.json``) and, for federated
arms, its run directory. An arm whose result file holds the same settings key is
not run again: a study that crashed or was stopped resumes where it stopped.
Then ``study.json``, ``report.md`` and ``plots/`` are written.

What the arms train on (the sites' data, the resolved bases) is
:mod:`.study_data`'s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...common.errors import WardroundError
from ...server.rundir import versions, write_json
from ..reporting import machine_info
from .arms import ArmOutcome, run_federated, run_local, run_pooled
from .catalog import Arm, ArmKind
from .cells import Cell, base_label
from .classical import run_classical
from .goals import evaluate_goals
from .plan import StudySettings
from .study_data import (
    STUDY_LIFETIME_BUDGET,
    ResolvedBase,
    describe_base,
    inspect_sites,
    prepare_federation,
    raise_lifetime_budget,
    resolve_bases,
    stage_sites,
)
from .summary import dp_worth, study_summary_json, summarise

__all__ = [
    "STUDY_LIFETIME_BUDGET",
    "ArmEvent",
    "ResolvedBase",
    "StudyResult",
    "federation_units",
    "inspect_sites",
    "prepare_federation",
    "raise_lifetime_budget",
    "resolve_bases",
    "run_arm",
    "run_study",
    "shard_units",
    "stage_sites",
    "write_docs",
]

log = logging.getLogger(__name__)

ArmId = tuple[str, int, str]
"""(cell key, seed, arm name)."""


@dataclass(frozen=True)
class ArmEvent:
    """One arm finished (or failed, or was found in the cache)."""

    cell: Cell
    seed: int
    arm: Arm
    index: int
    total: int
    outcome: ArmOutcome | None
    error: str | None
    cached: bool
    unscored: tuple[str, ...] = ()
    """Sites this arm is not scored at (none of its inputs there)."""


@dataclass
class StudyResult:
    """What :func:`run_study` wrote."""

    out_dir: Path
    data: dict[str, Any]
    """The content of ``study.json``."""
    ran: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)


def _arm_file(out_dir: Path, cell: Cell, seed: int, arm: Arm) -> Path:
    return (
        out_dir
        / "arms"
        / ("own-data" if cell.own_data else f"patients-{cell.patients}")
        / f"sites-{cell.sites}"
        / f"base-{base_label(cell.base)}"
        / f"seed-{seed}"
        / f"{arm.name}.json"
    )


def _cached(path: Path, key: str) -> dict[str, Any] | None:
    """The arm file's content if it holds a result for ``key``."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def run_arm(
    settings: StudySettings,
    arm: Arm,
    cell: Cell,
    site_tomls: list[Path],
    seed: int,
    arm_dir: Path,
    base_folder: Path | None = None,
) -> ArmOutcome:
    """Train and evaluate one arm in one cell and seed."""
    config = settings.arm_config(
        arm,
        cell,
        str(site_tomls[0].parent.parent),
        seed,
        str(arm_dir / "run"),
        str(base_folder) if base_folder is not None else None,
    )
    if arm.classical:
        return run_classical(config, site_tomls, arm.kind)
    if arm.kind is ArmKind.POOLED:
        return run_pooled(config, site_tomls, subgroups=arm.subgroups)
    if arm.kind is ArmKind.LOCAL:
        return run_local(config, site_tomls)
    return run_federated(config, site_tomls, arm_dir / "run", subgroups=arm.subgroups)


def federation_units(settings: StudySettings) -> list[tuple[int, int, int]]:
    """(patients, seed, site count) of every federation, in the order they run.

    A federation's cells (one per base) run in the same unit: they share its data.
    """
    cells = settings.cells()
    return [
        (p, seed, n)
        for p in settings.patients
        for seed in settings.seeds_for(p)
        for n in settings.site_counts
        if any(c.patients == p and c.sites == n for c in cells)
    ]


def shard_units(
    settings: StudySettings, units: list[tuple[int, int, int]], index: int, count: int
) -> list[tuple[int, int, int]]:
    """The units worker ``index`` of ``count`` runs (in the study's order).

    Balanced by an estimate of each unit's cost (patients × sites × arms): the
    largest first, each to the least loaded worker. Every worker computes the
    same split.
    """
    cells = settings.cells()

    def cost(unit: tuple[int, int, int]) -> int:
        p, _, n = unit
        arms = sum(
            len(settings.arms_for(c)) for c in cells if (c.patients, c.sites) == (p, n)
        )
        return p * n * arms

    loads = [0] * count
    mine = set()
    for position in sorted(range(len(units)), key=lambda i: (-cost(units[i]), i)):
        worker = loads.index(min(loads))
        loads[worker] += cost(units[position])
        if worker == index:
            mine.add(position)
    return [u for i, u in enumerate(units) if i in mine]


@dataclass
class _Progress:
    """What the arms of one call have given so far."""

    outcome: StudyResult
    results: dict[ArmId, ArmOutcome] = field(default_factory=dict)
    failures: dict[ArmId, str] = field(default_factory=dict)
    spans: list[tuple[float, float]] = field(default_factory=list)
    """When each arm ran (also those found cached)."""
    loads: list[float] = field(default_factory=list)
    """The machine's load average as each arm started."""


def run_study(
    settings: StudySettings,
    out_dir: Path,
    *,
    command: str,
    on_arm: Callable[[ArmEvent], None] | None = None,
    shard: tuple[int, int] | None = None,
    started: float | None = None,
    machine: dict[str, Any] | None = None,
) -> StudyResult:
    """Run (or resume) the study into ``out_dir``; write study.json, report and plots.

    Each site's data warnings are logged once, not once per arm.
    """
    from ...sitedata.dataset import each_data_warning_once

    with each_data_warning_once():
        return _run_study(
            settings,
            out_dir,
            command=command,
            on_arm=on_arm,
            shard=shard,
            started=started,
            machine=machine,
        )


def _run_study(
    settings: StudySettings,
    out_dir: Path,
    *,
    command: str,
    on_arm: Callable[[ArmEvent], None] | None,
    shard: tuple[int, int] | None,
    started: float | None,
    machine: dict[str, Any] | None,
) -> StudyResult:
    """:func:`run_study`'s work.

    An arm that raises a :class:`WardroundError` (a round that could not complete,
    a privacy refusal) is reported as failed, not cached, and the study goes on.
    With ``shard = (i, n)`` only the i-th of n shares of the federations
    (:func:`shard_units`) is run and nothing is summarised: n processes share
    the work through the arm files, and a last call without ``shard`` finds
    every arm cached and writes the summary.
    ``started`` and ``machine`` (:func:`~..reporting.machine_info`) say when and
    on what this command started, if before this call.
    """
    out_dir = Path(out_dir).resolve()
    settings = _with_site_data(settings, out_dir)
    started = started if started is not None else time.time()
    machine_start = machine if machine is not None else machine_info()
    units = federation_units(settings)
    if shard is not None:
        units = shard_units(settings, units, *shard)
    work = _work(settings, units)
    bases = resolve_bases(settings)
    _warn_left_out(settings, units)
    progress = _Progress(StudyResult(out_dir=out_dir, data={}))
    for index, (cell, seed, arm) in enumerate(work, start=1):
        event = _arm(settings, out_dir, cell, seed, arm, bases[cell.base], progress)
        if on_arm is not None:
            on_arm(replace(event, index=index, total=len(work)))
    if shard is None:
        _write_study(settings, progress, bases, command, started, machine_start)
    return progress.outcome


def _with_site_data(settings: StudySettings, out_dir: Path) -> StudySettings:
    """``--sites-dir``: the settings with the sites' fingerprints and gaps read."""
    if settings.sites_dir is None or settings.data_identity:
        return settings
    settings = inspect_sites(settings, out_dir)
    for name, why in settings.skipped().items():
        log.warning("arm %s is skipped: %s", name, why)
    return settings


def _work(
    settings: StudySettings, units: list[tuple[int, int, int]]
) -> list[tuple[Cell, int, Arm]]:
    """(cell, seed, arm) of every arm run of ``units``, in the order they run."""
    cells = settings.cells()
    return [
        (cell, seed, arm)
        for p, seed, n in units
        for cell in cells
        if (cell.patients, cell.sites) == (p, n)
        for arm in settings.arms_for(cell)
    ]


def _warn_left_out(settings: StudySettings, units: list[tuple[int, int, int]]) -> None:
    for n_sites in sorted({n for _, _, n in units}):
        left_out = settings.arms_left_out(n_sites)
        if left_out:
            log.warning(
                "%d sites: SecAgg+ needs at least 3, so these arms do not run: %s",
                n_sites,
                ", ".join(a.name for a in left_out),
            )


def _arm(
    settings: StudySettings,
    out_dir: Path,
    cell: Cell,
    seed: int,
    arm: Arm,
    base: ResolvedBase,
    progress: _Progress,
) -> ArmEvent:
    """Read one arm's result from its file, or run it and write the file.

    Returns the arm's event (its place in the work list left for the caller).
    """
    key = settings.arm_key(arm, cell, seed, base.identity)
    path = _arm_file(out_dir, cell, seed, arm)
    cached = _cached(path, key)
    error = None
    if cached is not None:
        result: ArmOutcome | None = ArmOutcome.from_json(cached["outcome"])
        progress.outcome.cached += 1
        progress.spans.append((cached["started"], cached["finished"]))
        if "load_average" in cached:
            progress.loads.append(cached["load_average"])
    else:
        result, error = _run_and_record(
            settings, out_dir, cell, seed, arm, base, key, path, progress
        )
    if result is not None:
        progress.results[(cell.key, seed, arm.name)] = result
    return ArmEvent(
        cell,
        seed,
        arm,
        0,
        0,
        result,
        error,
        cached is not None,
        tuple(settings.unscored_sites(arm)),
    )


def _run_and_record(
    settings: StudySettings,
    out_dir: Path,
    cell: Cell,
    seed: int,
    arm: Arm,
    base: ResolvedBase,
    key: str,
    path: Path,
    progress: _Progress,
) -> tuple[ArmOutcome | None, str | None]:
    """Run one arm; write its file under ``key``, or record why it failed."""
    site_tomls = prepare_federation(settings, out_dir, cell.patients, cell.sites, seed)
    arm_started, load = time.time(), os.getloadavg()[0]
    try:
        result = run_arm(
            settings, arm, cell, site_tomls, seed, path.with_suffix(""), base.folder
        )
    except WardroundError as exc:
        error = f"{type(exc).__name__}: {exc.message}"
        log.error("arm %s (%s, seed %d) failed: %s", arm.name, cell.label, seed, error)
        progress.failures[(cell.key, seed, arm.name)] = error
        progress.outcome.failed.append(f"{cell.key}/{seed}/{arm.name}")
        return None, error
    progress.outcome.ran += 1
    progress.spans.append((arm_started, time.time()))
    progress.loads.append(load)
    write_json(
        path,
        {
            "key": key,
            "arm": arm.name,
            **cell.as_dict(),
            "seed": seed,
            "started": arm_started,
            "finished": progress.spans[-1][1],
            "load_average": load,
            "outcome": result.to_json(),
        },
    )
    return result, None


def _write_study(
    settings: StudySettings,
    progress: _Progress,
    bases: dict[str, ResolvedBase],
    command: str,
    started: float,
    machine_start: dict[str, Any],
) -> None:
    """Summarise every arm; write study.json, the plots and report.md."""
    from .plots import write_plots
    from .report import render_report

    outcome, results, spans, loads = (
        progress.outcome,
        progress.results,
        progress.spans,
        progress.loads,
    )
    cells = settings.cells()
    labels = settings.base_config("sites", cells[0], 0).task.labels if cells else ()
    summary = summarise(settings, results, labels)
    goals = evaluate_goals(settings, summary)
    data = {
        "study": "quality",
        "command": command,
        "started": started,
        "finished": time.time(),
        "wall_seconds": time.time() - started,
        # from the first arm's start to the last one's end, over every call
        "arms_span_seconds": (
            max(end for _, end in spans) - min(start for start, _ in spans)
            if spans
            else 0.0
        ),
        "arm_load_average_range": [min(loads), max(loads)] if loads else None,
        "arms_run": outcome.ran,
        "arms_cached": outcome.cached,
        # compute time of every arm, also of those this call found cached
        "arm_seconds_total": sum(r.seconds for r in results.values()),
        "arm_cpu_seconds_total": sum(r.cpu_seconds for r in results.values()),
        "machine": {
            **machine_start,
            "load_average_end": machine_info()["load_average"],
        },
        "versions": versions(),
        "bases": {
            base_label(name): describe_base(resolved)
            for name, resolved in bases.items()
        },
        "dp_worth": dp_worth(settings, summary),
        **study_summary_json(settings, summary, goals, results, progress.failures),
    }
    out_dir = outcome.out_dir
    write_json(out_dir / "study.json", data)
    # render from the file as written (NaN there is null), as --write-docs will
    outcome.data = json.loads((out_dir / "study.json").read_text())
    plots = write_plots(outcome.data, out_dir / "plots")
    (out_dir / "report.md").write_text(
        render_report(outcome.data, plots, relative_to=out_dir)
    )


def write_docs(result: StudyResult, docs_path: Path) -> list[Path]:
    """Copy the plots next to ``docs_path`` and rewrite its ``study:quality`` section.

    Returns the plot files written under ``<docs folder>/plots/``.
    """
    import shutil

    from ..reporting import write_marked_section
    from .plots import plot_names
    from .report import DOCS_SECTION, render_report

    docs_path = Path(docs_path).resolve()
    plot_dir = docs_path.parent / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name in plot_names(result.data):
        source = result.out_dir / "plots" / f"{name}.png"
        if source.is_file():
            plots[name] = plot_dir / f"study-quality-{name}.png"
            shutil.copyfile(source, plots[name])
    for stale in plot_dir.glob("study-quality-*.png"):  # plots of an earlier design
        if stale not in plots.values():
            stale.unlink()
    body = render_report(result.data, plots, relative_to=docs_path.parent)
    write_marked_section(docs_path, DOCS_SECTION, body)
    return list(plots.values())
