"""From per-arm, per-seed outcomes to the study's summary (pure).

Every AUROC here is the macro AUROC over the findings, on a site's validation
split; "mean over sites" weighs every hospital once. Over seeds, figures are
mean ± sample sd. Ratios to pooled are ratios of the means over seeds. The goals
checked on this summary are in :mod:`.goals`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .arms import ArmOutcome
from .catalog import Arm, ArmKind
from .plan import StudySettings
from .stats import Goal, MeanSd, group_order, mean_sd, ratio, site_mean

Results = Mapping[tuple[str, int, str], ArmOutcome]
"""(cell key, seed, arm name) -> outcome; missing keys: the arm failed."""

CLASSICAL_POOLED = "classical-pooled"


def _ms(values: list[float]) -> dict[str, Any]:
    return mean_sd(values).to_json()


def summarise_arm(
    arm: Arm, outcomes: list[ArmOutcome], labels: tuple[str, ...]
) -> dict[str, Any]:
    """One arm over the seeds of one federation."""
    if not outcomes:
        return {"label": arm.label, "group": arm.group.value, "seeds": 0}
    sites = sorted(outcomes[0].final)
    return {
        **_describe_arm(arm, len(outcomes)),
        **_auroc_figures(outcomes, sites, labels),
        **_cost_figures(outcomes, sites),
        **_federated_figures(outcomes),
    }


def _describe_arm(arm: Arm, seeds: int) -> dict[str, Any]:
    return {
        "label": arm.label,
        "group": arm.group.value,
        "kind": arm.kind.value,
        "classical": arm.classical,
        "target_epsilon": arm.epsilon,
        "secure_aggregation": arm.secure_aggregation,
        "seeds": seeds,
    }


def _auroc_figures(
    outcomes: list[ArmOutcome], sites: list[str], labels: tuple[str, ...]
) -> dict[str, Any]:
    """Mean and sd over seeds: overall, per site, per round, per label."""
    rounds = min(len(o.per_round) for o in outcomes)
    return {
        "auroc": _ms([site_mean(o.final) for o in outcomes]),
        "per_site": {
            s: _ms([o.final.get(s, math.nan) for o in outcomes]) for s in sites
        },
        "per_round": [
            _ms([site_mean(o.per_round[r]) for o in outcomes]) for r in range(rounds)
        ],
        "per_label": {
            label: _ms([_label_site_mean(o, sites, label) for o in outcomes])
            for label in labels
        },
    }


def _label_site_mean(outcome: ArmOutcome, sites: list[str], label: str) -> float:
    """One finding's AUROC, mean over the sites where it is defined (else NaN)."""
    values = [outcome.per_label[s].get(label, math.nan) for s in sites]
    if not any(math.isfinite(v) for v in values):
        return math.nan
    return float(np.nanmean(values))


def _cost_figures(outcomes: list[ArmOutcome], sites: list[str]) -> dict[str, Any]:
    """Time, and per site the examples (mean over seeds: each draws its hospitals)."""
    return {
        "seconds": _ms([o.seconds for o in outcomes]),
        "cpu_seconds": _ms([o.cpu_seconds for o in outcomes]),
        "train_examples": {
            s: float(np.mean([o.train_examples.get(s, 0) for o in outcomes]))
            for s in sites
        },
        "validation_examples": {
            s: float(np.mean([o.validation_examples.get(s, 0) for o in outcomes]))
            for s in sites
        },
    }


def _federated_figures(outcomes: list[ArmOutcome]) -> dict[str, Any]:
    """Upload, epsilon, round times and subgroups: where every seed measured them."""
    out: dict[str, Any] = {}
    uploads = [o.upload_bytes_per_round for o in outcomes]
    if all(uploads):
        out["upload_bytes_per_site_per_round"] = _ms(
            [float(np.mean(list(u.values()))) for u in uploads if u]
        )
        out["model"] = outcomes[0].model
    epsilons = [o.epsilon for o in outcomes]
    if all(epsilons):
        out["epsilon"] = _ms([float(np.mean(list(e.values()))) for e in epsilons if e])
    rounds = [o.round_seconds for o in outcomes]
    aggregations = [o.aggregation_seconds for o in outcomes]
    if all(rounds):
        out["round_seconds"] = _ms([float(np.mean(r)) for r in rounds if r])
        out["aggregation_seconds"] = _ms(
            [float(np.mean(a)) for a in aggregations if a is not None]
        )
    subgroups = [o.subgroups for o in outcomes]
    if all(subgroups):
        found = [g for g in subgroups if g]
        out["subgroups"] = {
            dimension: _subgroup_figures(found, dimension) for dimension in found[0]
        }
    return out


def _subgroup_figures(
    subgroups: list[dict[str, dict[str, dict[str, float]]]], dimension: str
) -> dict[str, dict[str, Any]]:
    """Group -> AUROC (mean ± sd) and size (mean) over the seeds that have it."""
    groups = sorted({g for seed in subgroups for g in seed[dimension]}, key=group_order)
    out = {}
    for group in groups:
        found = [
            seed[dimension][group] for seed in subgroups if group in seed[dimension]
        ]
        out[group] = {
            "auroc": _ms([g["auroc"] for g in found]),
            "n": float(np.mean([g["n"] for g in found])),
        }
    return out


def summarise(
    settings: StudySettings, results: Results, labels: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Cell key -> arm name -> :func:`summarise_arm`, with comparisons added."""
    out: dict[str, dict[str, Any]] = {}
    for cell in settings.cells():
        plan = settings.arms_for(cell)
        arms = {}
        for arm in plan:
            unscored = settings.unscored_sites(arm)
            outcomes = [
                without_sites(results[(cell.key, seed, arm.name)], unscored)
                for seed in settings.seeds_for(cell.patients)
                if (cell.key, seed, arm.name) in results
            ]
            arms[arm.name] = summarise_arm(arm, outcomes, labels)
            if unscored and outcomes:
                arms[arm.name]["unscored_sites"] = unscored
        _compare(arms, plan, settings.site_decimals)
        out[cell.key] = arms
    return out


def without_sites(outcome: ArmOutcome, sites: Mapping[str, str]) -> ArmOutcome:
    """``outcome`` with the AUROCs of ``sites`` unmeasured (NaN).

    Every mean, ratio and comparison then leaves those sites out.
    """
    if not sites:
        return outcome
    return replace(
        outcome,
        per_round=[
            {s: math.nan if s in sites else v for s, v in r.items()}
            for r in outcome.per_round
        ],
        per_label={
            s: dict.fromkeys(labels, math.nan) if s in sites else labels
            for s, labels in outcome.per_label.items()
        },
        # pooled over every site's predictions: those sites' cannot be taken out
        subgroups=None,
    )


def _compare(
    arms: dict[str, dict[str, Any]],
    plan: tuple[Arm, ...],
    decimals: Mapping[str, int],
) -> None:
    """Add each arm's ratio to pooled and how many sites beat their local-only model."""
    pooled = arm_auroc(arms, "pooled")
    classical = arm_auroc(arms, CLASSICAL_POOLED)
    for arm in plan:
        entry = arms[arm.name]
        if not entry.get("seeds"):
            continue
        local = arms.get("classical-local" if arm.classical else "local", {}).get(
            "per_site", {}
        )
        mine = entry["auroc"]["mean"]
        if entry.get("unscored_sites"):  # pooled and classical on the same sites
            pooled_here = mean_on_sites(arms.get("pooled", {}), entry)
            classical_here = mean_on_sites(arms.get(CLASSICAL_POOLED, {}), entry)
        else:
            pooled_here, classical_here = pooled, classical
        entry["ratio_to_pooled"] = ratio(mine, pooled_here)
        entry["minus_classical"] = mine - classical_here
        # a site whose AUROC is undefined (its validation split lacks positives or
        # negatives) is neither the worst nor below its local-only model
        per_site = {
            s: v["mean"]
            for s, v in entry["per_site"].items()
            if math.isfinite(v["mean"])
        }
        entry["worst_site"] = min(per_site.values()) if per_site else math.nan
        if arm.kind is ArmKind.FEDERATED and local:
            compared = [
                s for s in per_site if s in local and math.isfinite(local[s]["mean"])
            ]
            entry["sites_above_local"] = sum(
                site_margin(
                    per_site[s],
                    local[s]["mean"],
                    decimals.get(s, SITE_AUROC_DECIMALS),
                )
                > 0
                for s in compared
            )
            entry["sites"] = len(compared)


SITE_AUROC_DECIMALS = 3
"""What a site reports its AUROC to by default (``[answers] decimals``); the arms
trained on this machine (pooled, local only) are not rounded, so two sites' values
are compared at that precision: a smaller difference is a tie."""


def site_margin(
    value: float, reference: float, decimals: int = SITE_AUROC_DECIMALS
) -> float:
    """``value - reference`` at the precision a site reports (0.0 for a tie).

    ``decimals``: the site's ``[answers] decimals`` (a site that reports 0.8 is
    not above a local-only 0.783 computed here unrounded: both are 0.8).
    """
    return round(round(value, decimals) - round(reference, decimals), decimals) + 0.0


def mean_on_sites(entry: Mapping[str, Any], scored: Mapping[str, Any]) -> float:
    """``entry``'s mean AUROC over the sites where ``scored`` has a value.

    Without sites left out of ``scored``, ``entry``'s own mean.
    """
    if not scored.get("unscored_sites"):
        return float(entry.get("auroc", {}).get("mean", math.nan))
    sites = [
        s
        for s, v in scored.get("per_site", {}).items()
        if v.get("mean") is not None and math.isfinite(v["mean"])
    ]
    values = [entry.get("per_site", {}).get(s, {}).get("mean", math.nan) for s in sites]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def against_best_single(
    fused: Mapping[str, Any], singles: Mapping[str, Mapping[str, Any]]
) -> tuple[str, float, float] | None:
    """The single modality the fused model leads by least, on the same sites.

    Returns (modality, its AUROC, the fused model's AUROC on its sites); when
    every arm scores every site, that is the best single modality.
    """
    options = []
    for name, entry in singles.items():
        single = entry.get("auroc", {}).get("mean", math.nan)
        here = mean_on_sites(fused, entry)
        if math.isfinite(single) and math.isfinite(here):
            options.append((here - single, name, single, here))
    if not options:
        return None
    _, name, single, here = min(options)
    return name, single, here


def arm_auroc(arms: Mapping[str, Any], name: str) -> float:
    """The mean AUROC of arm ``name`` in a cell's summary (NaN: no result)."""
    return arms.get(name, {}).get("auroc", {}).get("mean", math.nan)


def dp_arm(arms: Mapping[str, Any], epsilon: float) -> dict[str, Any] | None:
    """The FedAvg + DP arm at ``epsilon`` (without SecAgg+), if it has results."""
    for entry in arms.values():
        if (
            entry.get("seeds")
            and not entry.get("classical")
            and entry.get("target_epsilon") == epsilon
            and not entry.get("secure_aggregation")
        ):
            return entry
    return None


def dp_worth(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Where DP is worth it: per cell with DP arms, what each ε keeps of pooled.

    "With n patients per site, ε keeps X of pooled": X is the DP FedAvg AUROC over
    the pooled AUROC without DP, same cell (same size, sites and base). Also the
    sites where the DP model beats that site's local-only model (without DP).
    """
    rows = []
    for cell in settings.cells():
        arms = summary.get(cell.key, {})
        dp = {}
        for eps in sorted(settings.epsilons, reverse=True):
            entry = dp_arm(arms, eps)
            if entry is None:
                continue
            dp[f"{eps:g}"] = {
                "auroc": entry["auroc"]["mean"],
                "ratio_to_pooled": entry.get("ratio_to_pooled", math.nan),
                "sites_above_local": entry.get("sites_above_local"),
                "sites": entry.get("sites"),
            }
        if not dp:
            continue
        rows.append(
            {
                "cell": cell.key,
                **cell.as_dict(),
                "seeds": len(settings.seeds_for(cell.patients)),
                "pooled": arm_auroc(arms, "pooled"),
                "local": arm_auroc(arms, "local"),
                "classical": arm_auroc(arms, CLASSICAL_POOLED),
                "classical_dp": {
                    f"{eps:g}": arm_auroc(arms, f"classical-fedavg-dp-eps{eps:g}")
                    for eps in settings.epsilons
                },
                "fedavg": arm_auroc(arms, "fedavg"),
                "fedavg_ratio_to_pooled": arms.get("fedavg", {}).get(
                    "ratio_to_pooled", math.nan
                ),
                "dp": dp,
            }
        )
    return rows


def study_summary_json(
    settings: StudySettings,
    summary: Mapping[str, Any],
    goals: list[Goal],
    results: Results,
    failures: Mapping[tuple[str, int, str], str],
) -> dict[str, Any]:
    """The JSON-ready body of ``study.json`` (without run metadata)."""
    return {
        "settings": settings.describe(),
        "summary": summary,
        "goals": [g.to_json() for g in goals],
        "results": {
            f"{cell}/{seed}/{arm}": outcome.to_json()
            for (cell, seed, arm), outcome in sorted(results.items())
        },
        "failures": {
            f"{cell}/{seed}/{arm}": why
            for (cell, seed, arm), why in sorted(failures.items())
        },
    }


def fmt(value: MeanSd | Mapping[str, Any] | None, digits: int = 3) -> str:
    """'0.741 ± 0.012' (no ± for one seed; '—' when not measured)."""
    if value is None:
        return "—"
    if isinstance(value, MeanSd):
        value = value.to_json()
    mean, sd = value.get("mean", math.nan), value.get("sd", math.nan)
    if mean is None or not math.isfinite(mean):
        return "—"
    if sd is None or not math.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
