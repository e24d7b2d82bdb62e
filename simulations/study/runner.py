"""The learning-quality study: every arm on every federation and seed, then a report.

The output folder holds, per seed and site count, the synthetic hospitals
(``data/seed-S/sites-N/``) and, per arm, its result (``arms/sites-N/seed-S/ARM.json``)
and, for federated arms, its run directory. An arm whose result file holds the
same settings key is not run again: a study that crashed or was stopped resumes
where it stopped. Then ``study.json``, ``report.md`` and ``plots/`` are written.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ...common.errors import WardroundError
from ...server.rundir import versions, write_json
from ..reporting import machine_info
from .arms import ArmOutcome, run_federated, run_local, run_pooled
from .plan import Arm, ArmKind, StudySettings
from .summary import evaluate_goals, study_summary_json, summarise

log = logging.getLogger(__name__)

STUDY_LIFETIME_BUDGET = 1_000_000.0
"""The study's sites' lifetime epsilon budget: every DP arm is a separate run on the
same synthetic patients, and the synthetic default (100) would stop the study
after a few of them. Each run's own limit (``max-epsilon``, 10) still applies."""


@dataclass(frozen=True)
class ArmEvent:
    """One arm finished (or failed, or was found in the cache)."""

    n_sites: int
    seed: int
    arm: Arm
    index: int
    total: int
    outcome: ArmOutcome | None
    error: str | None
    cached: bool


@dataclass
class StudyResult:
    """What :func:`run_study` wrote."""

    out_dir: Path
    data: dict[str, Any]
    """The content of ``study.json``."""
    ran: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)


def prepare_federation(
    settings: StudySettings, out_dir: Path, n_sites: int, seed: int
) -> list[Path]:
    """The synthetic hospitals of one site count and seed (written once, then reused)."""
    from ..synth import synthesize_federation

    root = out_dir / "data" / f"seed-{seed}" / f"sites-{n_sites}"
    marker = root / "federation.json"
    wanted = {"sites": n_sites, "seed": seed, **settings.data_key()}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(
        json.dumps(wanted)
    ):
        return sorted(root.glob("*/site.toml"))
    marker.unlink(missing_ok=True)
    paths = synthesize_federation(
        root,
        n_sites,
        patients_per_site=settings.patients_per_site,
        seed=seed,
        heterogeneity=settings.heterogeneity,
    )
    for site_toml in paths:
        doc = tomllib.loads(site_toml.read_text())
        doc["privacy"]["budget-epsilon"] = STUDY_LIFETIME_BUDGET
        site_toml.write_text(tomli_w.dumps(doc))
    write_json(marker, wanted)  # written last: the federation is complete
    return paths


def _arm_file(out_dir: Path, n_sites: int, seed: int, arm: Arm) -> Path:
    return out_dir / "arms" / f"sites-{n_sites}" / f"seed-{seed}" / f"{arm.name}.json"


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
    site_tomls: list[Path],
    seed: int,
    arm_dir: Path,
) -> ArmOutcome:
    """Train and evaluate one arm on one federation and seed."""
    n_sites = len(site_tomls)
    config = settings.arm_config(
        arm, str(site_tomls[0].parent.parent), n_sites, seed, str(arm_dir / "run")
    )
    if arm.kind is ArmKind.POOLED:
        return run_pooled(config, site_tomls, subgroups=arm.subgroups)
    if arm.kind is ArmKind.LOCAL:
        return run_local(config, site_tomls)
    return run_federated(config, site_tomls, arm_dir / "run", subgroups=arm.subgroups)


def federation_units(settings: StudySettings) -> list[tuple[int, int]]:
    """(seed, site count) of every federation, in the order the study runs them."""
    return [(seed, n) for seed in settings.seeds for n in settings.site_counts]


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

    An arm that raises a :class:`WardroundError` (a round that could not complete,
    a privacy refusal) is reported as failed, not cached, and the study goes on.
    With ``shard = (i, n)`` only every n-th federation (from the i-th) is run and
    nothing is summarised: n processes share the work through the arm files, and
    a last call without ``shard`` finds every arm cached and writes the summary.
    ``started`` and ``machine`` (:func:`~..reporting.machine_info`) say when and
    on what this command started, if before this call.
    """
    from ...common.config import RunConfig
    from .plots import write_plots
    from .report import render_report

    out_dir = Path(out_dir).resolve()
    started = started if started is not None else time.time()
    machine_start = machine if machine is not None else machine_info()
    units = federation_units(settings)
    if shard is not None:
        units = [u for i, u in enumerate(units) if i % shard[1] == shard[0]]
    work = [(seed, n, arm) for seed, n in units for arm in settings.arms_for(n)]
    for n_sites in sorted({n for _, n in units}):
        left_out = settings.arms_left_out(n_sites)
        if left_out:
            log.warning(
                "%d sites: SecAgg+ needs at least 3, so these arms do not run: %s",
                n_sites,
                ", ".join(a.name for a in left_out),
            )
    results: dict[tuple[int, int, str], ArmOutcome] = {}
    failures: dict[tuple[int, int, str], str] = {}
    outcome = StudyResult(out_dir=out_dir, data={})
    spans: list[tuple[float, float]] = []  # when each arm ran
    loads: list[float] = []  # the machine's load average as each arm started
    for index, (seed, n_sites, arm) in enumerate(work, start=1):
        key = settings.arm_key(arm, n_sites, seed)
        path = _arm_file(out_dir, n_sites, seed, arm)
        cached = _cached(path, key)
        error = None
        if cached is not None:
            result = ArmOutcome.from_json(cached["outcome"])
            outcome.cached += 1
            spans.append((cached["started"], cached["finished"]))
            if "load_average" in cached:
                loads.append(cached["load_average"])
        else:
            site_tomls = prepare_federation(settings, out_dir, n_sites, seed)
            arm_started, load = time.time(), os.getloadavg()[0]
            try:
                result = run_arm(settings, arm, site_tomls, seed, path.with_suffix(""))
            except WardroundError as exc:
                result, error = None, f"{type(exc).__name__}: {exc.message}"
                log.error(
                    "arm %s (%d sites, seed %d) failed: %s",
                    arm.name,
                    n_sites,
                    seed,
                    error,
                )
                failures[(n_sites, seed, arm.name)] = error
                outcome.failed.append(f"{n_sites}/{seed}/{arm.name}")
            else:
                outcome.ran += 1
                spans.append((arm_started, time.time()))
                loads.append(load)
                write_json(
                    path,
                    {
                        "key": key,
                        "arm": arm.name,
                        "sites": n_sites,
                        "seed": seed,
                        "started": arm_started,
                        "finished": spans[-1][1],
                        "load_average": load,
                        "outcome": result.to_json(),
                    },
                )
        if result is not None:
            results[(n_sites, seed, arm.name)] = result
        if on_arm is not None:
            on_arm(
                ArmEvent(
                    n_sites,
                    seed,
                    arm,
                    index,
                    len(work),
                    result,
                    error,
                    cached is not None,
                )
            )
    if shard is not None:
        return outcome

    labels = RunConfig().task.labels
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
        **study_summary_json(settings, summary, goals, results, failures),
    }
    write_json(out_dir / "study.json", data)
    # render from the file as written (NaN there is null), as --write-docs will
    outcome.data = json.loads((out_dir / "study.json").read_text())
    plots = write_plots(outcome.data, out_dir / "plots")
    (out_dir / "report.md").write_text(
        render_report(outcome.data, plots, relative_to=out_dir)
    )
    return outcome


def write_docs(result: StudyResult, docs_path: Path) -> list[Path]:
    """Copy the plots next to ``docs_path`` and rewrite its ``study:quality`` section.

    Returns the plot files written under ``<docs folder>/plots/``.
    """
    import shutil

    from ..reporting import write_marked_section
    from .report import DOCS_SECTION, render_report

    docs_path = Path(docs_path).resolve()
    plot_dir = docs_path.parent / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name in ("rounds", "privacy", "sites"):
        source = result.out_dir / "plots" / f"{name}.png"
        if source.is_file():
            plots[name] = plot_dir / f"study-quality-{name}.png"
            shutil.copyfile(source, plots[name])
    body = render_report(result.data, plots, relative_to=docs_path.parent)
    write_marked_section(docs_path, DOCS_SECTION, body)
    return list(plots.values())
