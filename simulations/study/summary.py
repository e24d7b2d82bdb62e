"""From per-arm, per-seed outcomes to the study's summary and its goals (pure).

Every AUROC here is the macro AUROC over the findings, on a site's validation
split; "mean over sites" weighs every hospital once. Over seeds, figures are
mean ± sample sd. Ratios to pooled are ratios of the means over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...common.config import Modality
from .arms import ArmOutcome
from .plan import Arm, ArmGroup, ArmKind, StudySettings
from .stats import Goal, MeanSd, at_least, group_order, mean_sd, ratio, site_mean

Results = Mapping[tuple[int, int, str], ArmOutcome]
"""(site count, seed, arm name) -> outcome; missing keys: the arm failed."""

FEDERATED_VS_POOLED = 0.97
DP_VS_POOLED = 0.90
DP_GOAL_EPSILON = 8.0
FUSION_MARGIN = 0.03


def _ms(values: list[float]) -> dict[str, Any]:
    return mean_sd(values).to_json()


def summarise_arm(
    arm: Arm, outcomes: list[ArmOutcome], labels: tuple[str, ...]
) -> dict[str, Any]:
    """One arm over the seeds of one federation."""
    if not outcomes:
        return {"label": arm.label, "group": arm.group.value, "seeds": 0}
    sites = sorted(outcomes[0].final)
    rounds = min(len(o.per_round) for o in outcomes)
    summary: dict[str, Any] = {
        "label": arm.label,
        "group": arm.group.value,
        "kind": arm.kind.value,
        "target_epsilon": arm.epsilon,
        "secure_aggregation": arm.secure_aggregation,
        "seeds": len(outcomes),
        "auroc": _ms([site_mean(o.final) for o in outcomes]),
        "per_site": {
            s: _ms([o.final.get(s, math.nan) for o in outcomes]) for s in sites
        },
        "per_round": [
            _ms([site_mean(o.per_round[r]) for o in outcomes]) for r in range(rounds)
        ],
        "per_label": {
            label: _ms(
                [
                    float(
                        np.nanmean([o.per_label[s].get(label, math.nan) for s in sites])
                    )
                    if any(
                        math.isfinite(o.per_label[s].get(label, math.nan))
                        for s in sites
                    )
                    else math.nan
                    for o in outcomes
                ]
            )
            for label in labels
        },
        "seconds": _ms([o.seconds for o in outcomes]),
        "cpu_seconds": _ms([o.cpu_seconds for o in outcomes]),
        # per site, the mean over seeds (each seed draws its own hospitals)
        "train_examples": {
            s: float(np.mean([o.train_examples.get(s, 0) for o in outcomes]))
            for s in sites
        },
        "validation_examples": {
            s: float(np.mean([o.validation_examples.get(s, 0) for o in outcomes]))
            for s in sites
        },
    }
    if all(o.upload_bytes_per_round for o in outcomes):
        summary["upload_bytes_per_site_per_round"] = _ms(
            [float(np.mean(list(o.upload_bytes_per_round.values()))) for o in outcomes]
        )
        summary["model"] = outcomes[0].model
    if all(o.epsilon for o in outcomes):
        summary["epsilon"] = _ms(
            [float(np.mean(list(o.epsilon.values()))) for o in outcomes]
        )
    if all(o.round_seconds for o in outcomes):
        summary["round_seconds"] = _ms(
            [float(np.mean(o.round_seconds)) for o in outcomes]
        )
        summary["aggregation_seconds"] = _ms(
            [float(np.mean(o.aggregation_seconds)) for o in outcomes]
        )
    if all(o.subgroups for o in outcomes):
        summary["subgroups"] = {
            dimension: {
                group: {
                    "auroc": _ms(
                        [
                            o.subgroups[dimension][group]["auroc"]
                            for o in outcomes
                            if group in o.subgroups[dimension]
                        ]
                    ),
                    "n": float(
                        np.mean(
                            [
                                o.subgroups[dimension][group]["n"]
                                for o in outcomes
                                if group in o.subgroups[dimension]
                            ]
                        )
                    ),
                }
                for group in sorted(
                    {g for o in outcomes for g in o.subgroups[dimension]},
                    key=group_order,
                )
            }
            for dimension in outcomes[0].subgroups
        }
    return summary


def summarise(
    settings: StudySettings, results: Results, labels: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Site count -> arm name -> :func:`summarise_arm`, with comparisons added."""
    out: dict[str, dict[str, Any]] = {}
    for n_sites in settings.site_counts:
        arms = {}
        for arm in settings.arms_for(n_sites):
            outcomes = [
                results[(n_sites, seed, arm.name)]
                for seed in settings.seeds
                if (n_sites, seed, arm.name) in results
            ]
            arms[arm.name] = summarise_arm(arm, outcomes, labels)
        _compare(arms, settings.arms_for(n_sites))
        out[str(n_sites)] = arms
    return out


def _compare(arms: dict[str, dict[str, Any]], plan: tuple[Arm, ...]) -> None:
    """Add each arm's ratio to pooled and how many sites beat their local-only model."""
    pooled = arms.get("pooled", {}).get("auroc", {}).get("mean", math.nan)
    local = arms.get("local", {}).get("per_site", {})
    for arm in plan:
        entry = arms[arm.name]
        if not entry.get("seeds"):
            continue
        entry["ratio_to_pooled"] = ratio(entry["auroc"]["mean"], pooled)
        per_site = {s: v["mean"] for s, v in entry["per_site"].items()}
        entry["worst_site"] = min(per_site.values()) if per_site else math.nan
        if arm.kind is ArmKind.FEDERATED and local:
            entry["sites_above_local"] = sum(
                per_site[s] > local[s]["mean"] for s in per_site if s in local
            )
            entry["sites"] = len(per_site)


def _auroc(arms: Mapping[str, Any], name: str) -> float:
    return arms.get(name, {}).get("auroc", {}).get("mean", math.nan)


def evaluate_goals(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]]
) -> list[Goal]:
    """The issue's learning-quality goals, per federation size, with the numbers."""
    goals: list[Goal] = []
    for n_sites in settings.site_counts:
        arms = summary[str(n_sites)]
        pooled = _auroc(arms, "pooled")
        plan = {a.name: a for a in settings.arms_for(n_sites)}
        strategies = [
            a
            for a in plan.values()
            if a.group is ArmGroup.STRATEGY and arms[a.name].get("seeds")
        ]
        for arm in strategies:
            entry = arms[arm.name]
            goals.append(
                at_least(
                    "federated_vs_pooled",
                    n_sites,
                    f"{arm.label} without DP ≥ {FEDERATED_VS_POOLED} × pooled AUROC",
                    f"{entry['auroc']['mean']:.3f} vs pooled {pooled:.3f}: "
                    f"{entry['ratio_to_pooled']:.3f}×",
                    entry["ratio_to_pooled"],
                    FEDERATED_VS_POOLED,
                )
            )
            if "sites_above_local" in entry:
                goals.append(
                    at_least(
                        "every_site_above_local",
                        n_sites,
                        f"{arm.label}: every site's AUROC above its local-only model",
                        f"{entry['sites_above_local']} of {entry['sites']} sites",
                        float(entry["sites_above_local"]),
                        float(entry["sites"]),
                    )
                )
        for arm in plan.values():
            if (
                arm.epsilon is None
                or arm.secure_aggregation
                or not arms[arm.name].get("seeds")
            ):
                continue
            entry = arms[arm.name]
            target = DP_VS_POOLED if arm.epsilon == DP_GOAL_EPSILON else None
            goal = (
                f"{arm.label} ≥ {DP_VS_POOLED} × pooled AUROC"
                if target is not None
                else f"{arm.label} (reported: where it lands)"
            )
            goals.append(
                at_least(
                    "dp_vs_pooled",
                    n_sites,
                    goal,
                    f"{entry['auroc']['mean']:.3f}: {entry['ratio_to_pooled']:.3f}× pooled",
                    entry["ratio_to_pooled"],
                    target,
                )
            )
        goals += _fusion_goals(n_sites, arms, plan)
    return goals


def _fusion_goals(
    n_sites: int, arms: Mapping[str, Any], plan: Mapping[str, Arm]
) -> list[Goal]:
    singles = {
        a.modalities[0].value: _auroc(arms, a.name)
        for a in plan.values()
        if a.group is ArmGroup.MODALITY and len(a.modalities) == 1
    }
    singles = {k: v for k, v in singles.items() if math.isfinite(v)}
    if len(singles) < len(Modality):
        return []
    best_name = max(singles, key=singles.__getitem__)
    fused = [
        a
        for a in plan.values()
        if a.kind is ArmKind.FEDERATED
        and len(a.modalities) == len(Modality)
        and a.epsilon is None
        and not a.secure_aggregation
        and a.strategy.value == "fedavg"
        and arms[a.name].get("seeds")
    ]
    goals = []
    for arm in fused:
        margin = _auroc(arms, arm.name) - singles[best_name]
        goals.append(
            at_least(
                "fused_vs_best_single",
                n_sites,
                f"fused ({arm.fusion.value}) ≥ best single modality + {FUSION_MARGIN}",
                f"{_auroc(arms, arm.name):.3f} vs {best_name} only "
                f"{singles[best_name]:.3f}: {margin:+.3f}",
                margin,
                FUSION_MARGIN,
            )
        )
    return goals


def study_summary_json(
    settings: StudySettings,
    summary: Mapping[str, Any],
    goals: list[Goal],
    results: Results,
    failures: Mapping[tuple[int, int, str], str],
) -> dict[str, Any]:
    """The JSON-ready body of ``study.json`` (without run metadata)."""
    return {
        "settings": settings.describe(),
        "summary": summary,
        "goals": [g.to_json() for g in goals],
        "results": {
            f"{n}/{seed}/{arm}": outcome.to_json()
            for (n, seed, arm), outcome in sorted(results.items())
        },
        "failures": {
            f"{n}/{seed}/{arm}": why for (n, seed, arm), why in sorted(failures.items())
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
