"""The learning-quality study: every arm on every federation and seed, then a report.

The output folder holds, per size, seed and site count, the synthetic hospitals
(``data/patients-P/seed-S/sites-N/``, shared by every base) and, per arm, its
result (``arms/patients-P/sites-N/base-B/seed-S/ARM.json``) and, for federated
arms, its run directory. An arm whose result file holds the same settings key is
not run again: a study that crashed or was stopped resumes where it stopped.
Then ``study.json``, ``report.md`` and ``plots/`` are written.

The pretrained base is resolved once, before any arm: ``pretrained`` is the public
synthetic base for the study's shapes (built on first use with init seed 0 and
cached, see :mod:`~wardround.simulations.public_base`), and every arm of a
pretrained cell, the single-modality ablations included, loads that folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from ...client.site_config import SiteConfig
from ...common.errors import WardroundError
from ...server.rundir import versions, write_json
from ..reporting import machine_info
from .arms import ArmOutcome, run_federated, run_local, run_pooled
from .classical import run_classical
from .goals import evaluate_goals
from .plan import (
    OWN_DATA,
    RANDOM_BASE,
    Arm,
    ArmKind,
    Cell,
    StudySettings,
    base_label,
    site_tomls_in,
)
from .summary import dp_worth, study_summary_json, summarise

log = logging.getLogger(__name__)

STUDY_LIFETIME_BUDGET = 1_000_000.0
"""The study's sites' lifetime epsilon budget: every DP arm is a separate run on the
same synthetic patients, and the synthetic default (100) would stop the study
after a few of them. Each run's own limit (``max-epsilon``, 10) still applies."""


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


@dataclass
class StudyResult:
    """What :func:`run_study` wrote."""

    out_dir: Path
    data: dict[str, Any]
    """The content of ``study.json``."""
    ran: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ResolvedBase:
    """Where a study base is and what identifies it (random: nothing)."""

    folder: Path | None
    identity: dict[str, Any] | None
    """Part of every arm key of its cells: the pretrained layers' hash and the
    manifest's corpus and pretraining settings."""
    manifest: dict[str, Any] | None


def resolve_bases(settings: StudySettings) -> dict[str, ResolvedBase]:
    """Base (as in ``settings.bases``) -> its folder, building the public base once.

    The public base is built from a config with the study's shapes, every
    modality and init seed 0, so its bytes do not depend on which seed (or which
    ``--jobs`` worker) needs it first; concurrent workers wait on its lock.
    """
    from ...common.models.base_folder import check_fits, layers_sha256, read_manifest
    from ..public_base import public_base_folder

    out = {}
    for base in settings.bases:
        if base == RANDOM_BASE:
            out[base] = ResolvedBase(None, None, None)
            continue
        cell = Cell(settings.patients[0], settings.site_counts[0], RANDOM_BASE)
        config = settings.base_config("sites", cell, 0)
        if base == "pretrained":
            folder = public_base_folder(config)
        else:
            folder = Path(base).expanduser().resolve()
        manifest = read_manifest(folder)
        check_fits(folder, manifest, config)
        identity = {
            "layers_sha256": layers_sha256(folder),
            "corpus": manifest.get("corpus"),
            "pretrain": manifest.get("pretrain"),
            "init_seed": manifest.get("init_seed"),
        }
        out[base] = ResolvedBase(folder, identity, manifest)
    return out


def prepare_federation(
    settings: StudySettings, out_dir: Path, patients: int, n_sites: int, seed: int
) -> list[Path]:
    """The synthetic hospitals of one size, site count and seed (written once).

    Every base's cells of that size, site count and seed train on them.
    """
    from ..synth import synthesize_federation

    if settings.sites_dir is not None:
        return stage_sites(settings, out_dir)
    root = (
        out_dir / "data" / f"patients-{patients}" / f"seed-{seed}" / f"sites-{n_sites}"
    )
    marker = root / "federation.json"
    wanted = {"sites": n_sites, "seed": seed, **settings.data_key(patients)}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(
        json.dumps(wanted)
    ):
        return sorted(root.glob("*/site.toml"))
    marker.unlink(missing_ok=True)
    paths = synthesize_federation(
        root,
        n_sites,
        patients_per_site=patients,
        seed=seed,
        heterogeneity=settings.heterogeneity,
    )
    raise_lifetime_budget(paths)
    write_json(marker, wanted)  # written last: the federation is complete
    return paths


def stage_sites(settings: StudySettings, out_dir: Path) -> list[Path]:
    """Copies of the ``--sites-dir`` sites' site.toml the study runs on.

    The data stay where they are (paths made absolute); the copies put the image
    cache, the privacy ledger and the daemon state under ``out_dir``, so a study
    never writes into a site's folder nor spends its real privacy budget.
    """
    assert settings.sites_dir is not None
    staged = []
    for toml in site_tomls_in(Path(settings.sites_dir)):
        SiteConfig.from_toml(toml)  # a site that site check would refuse stops here
        doc = tomllib.loads(toml.read_text())
        home = toml.parent.resolve()
        target = out_dir / "data" / "sites-dir" / toml.parent.name
        data = doc.setdefault("data", {})
        if "dicom-dirs" in data:
            data["dicom-dirs"] = [str(home / d) for d in data["dicom-dirs"]]
        data["ehr"] = str(home / data.get("ehr", "ehr.parquet"))
        data["cache-dir"] = str(target / "cache")
        privacy = doc.setdefault("privacy", {})
        privacy["ledger-dir"] = str(target / "privacy-ledger")
        doc.setdefault("deployment", {})["state-dir"] = str(target / "state")
        target.mkdir(parents=True, exist_ok=True)
        (target / "site.toml").write_text(tomli_w.dumps(doc))
        staged.append(target / "site.toml")
    raise_lifetime_budget(staged)
    return staged


def inspect_sites(settings: StudySettings, out_dir: Path) -> StudySettings:
    """``settings`` with the modalities no ``--sites-dir`` site has, and its data.

    Loads every site's data once (as its ClientApp would) and keys the arms on
    each site's dataset fingerprint, so a changed site reruns its arms.
    """
    from ...client.runtime import get_runtime

    tomls = stage_sites(settings, out_dir)
    cell = Cell(OWN_DATA, len(tomls), RANDOM_BASE)
    config = settings.base_config(str(Path(settings.sites_dir or ".")), cell, 0)
    present = {"image": 0.0, "ehr": 0.0, "note": 0.0}
    fingerprints = {}
    for index, toml in enumerate(tomls):
        data = get_runtime(toml, index, config).data
        fingerprints[toml.parent.name] = data.fingerprint
        for dataset in (data.train, data.validation):
            flags = dataset.tensors["present"].sum(0).tolist()
            for name, count in zip(present, flags, strict=True):
                present[name] += count
    missing = {
        name: f"no site has {'images' if name == 'image' else name + 's'}"
        for name, count in present.items()
        if count == 0
    }
    return replace(settings, missing=missing, data_identity=fingerprints)


def raise_lifetime_budget(
    site_tomls: list[Path], epsilon: float = STUDY_LIFETIME_BUDGET
) -> None:
    """Give synthetic sites a lifetime budget that many runs cannot reach."""
    for site_toml in site_tomls:
        doc = tomllib.loads(site_toml.read_text())
        doc["privacy"]["budget-epsilon"] = epsilon
        site_toml.write_text(tomli_w.dumps(doc))


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
    With ``shard = (i, n)`` only the i-th of n shares of the federations
    (:func:`shard_units`) is run and nothing is summarised: n processes share
    the work through the arm files, and a last call without ``shard`` finds
    every arm cached and writes the summary.
    ``started`` and ``machine`` (:func:`~..reporting.machine_info`) say when and
    on what this command started, if before this call.
    """
    from .plots import write_plots
    from .report import render_report

    out_dir = Path(out_dir).resolve()
    if settings.sites_dir is not None and not settings.data_identity:
        settings = inspect_sites(settings, out_dir)
        for name, why in settings.skipped().items():
            log.warning("arm %s is skipped: %s", name, why)
    started = started if started is not None else time.time()
    machine_start = machine if machine is not None else machine_info()
    units = federation_units(settings)
    if shard is not None:
        units = shard_units(settings, units, *shard)
    cells = settings.cells()
    work = [
        (cell, seed, arm)
        for p, seed, n in units
        for cell in cells
        if (cell.patients, cell.sites) == (p, n)
        for arm in settings.arms_for(cell)
    ]
    bases = resolve_bases(settings)
    for n_sites in sorted({n for _, _, n in units}):
        left_out = settings.arms_left_out(n_sites)
        if left_out:
            log.warning(
                "%d sites: SecAgg+ needs at least 3, so these arms do not run: %s",
                n_sites,
                ", ".join(a.name for a in left_out),
            )
    results: dict[tuple[str, int, str], ArmOutcome] = {}
    failures: dict[tuple[str, int, str], str] = {}
    outcome = StudyResult(out_dir=out_dir, data={})
    spans: list[tuple[float, float]] = []  # when each arm ran
    loads: list[float] = []  # the machine's load average as each arm started
    for index, (cell, seed, arm) in enumerate(work, start=1):
        base = bases[cell.base]
        key = settings.arm_key(arm, cell, seed, base.identity)
        path = _arm_file(out_dir, cell, seed, arm)
        cached = _cached(path, key)
        error = None
        if cached is not None:
            result = ArmOutcome.from_json(cached["outcome"])
            outcome.cached += 1
            spans.append((cached["started"], cached["finished"]))
            if "load_average" in cached:
                loads.append(cached["load_average"])
        else:
            site_tomls = prepare_federation(
                settings, out_dir, cell.patients, cell.sites, seed
            )
            arm_started, load = time.time(), os.getloadavg()[0]
            try:
                result = run_arm(
                    settings,
                    arm,
                    cell,
                    site_tomls,
                    seed,
                    path.with_suffix(""),
                    base.folder,
                )
            except WardroundError as exc:
                result, error = None, f"{type(exc).__name__}: {exc.message}"
                log.error(
                    "arm %s (%s, seed %d) failed: %s", arm.name, cell.label, seed, error
                )
                failures[(cell.key, seed, arm.name)] = error
                outcome.failed.append(f"{cell.key}/{seed}/{arm.name}")
            else:
                outcome.ran += 1
                spans.append((arm_started, time.time()))
                loads.append(load)
                write_json(
                    path,
                    {
                        "key": key,
                        "arm": arm.name,
                        **cell.as_dict(),
                        "seed": seed,
                        "started": arm_started,
                        "finished": spans[-1][1],
                        "load_average": load,
                        "outcome": result.to_json(),
                    },
                )
        if result is not None:
            results[(cell.key, seed, arm.name)] = result
        if on_arm is not None:
            on_arm(
                ArmEvent(
                    cell,
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
            base_label(name): _describe_base(resolved)
            for name, resolved in bases.items()
        },
        "dp_worth": dp_worth(settings, summary),
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


def _describe_base(base: ResolvedBase) -> dict[str, Any] | None:
    """What the report says of a base: where it came from and how it was built."""
    if base.manifest is None:
        return None
    m = base.manifest
    return {
        "folder": base.folder.name if base.folder is not None else None,
        "corpus": m.get("corpus"),
        "corpus_examples": m.get("corpus_examples"),
        "pretrain": m.get("pretrain"),
        "objective": m.get("objective"),
        "init_seed": m.get("init_seed"),
        "loss_first": m.get("loss_first"),
        "loss_last_tenth": m.get("loss_last_tenth"),
        "seconds": m.get("seconds"),
        "layers_sha256": (base.identity or {}).get("layers_sha256"),
    }
