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
from .plan import RANDOM_BASE, Arm, ArmGroup, ArmKind, Cell, StudySettings, base_label
from .stats import Goal, MeanSd, at_least, group_order, mean_sd, ratio, site_mean

Results = Mapping[tuple[str, int, str], ArmOutcome]
"""(cell key, seed, arm name) -> outcome; missing keys: the arm failed."""

FEDERATED_VS_POOLED = 0.97
DP_VS_POOLED = ((8.0, 0.90), (3.0, 0.85))
"""(ε, least share of pooled AUROC without DP) at ``dp_goal_patients`` per site."""
DP_ABOVE_LOCAL_EPSILON = 8.0
"""At ``local_goal_patients`` per site, DP FedAvg at this ε beats every site's
local-only model (trained without DP)."""
FUSION_MARGIN = 0.03
CLASSICAL_POOLED = "classical-pooled"
CLASSICAL_DP_EPSILON = 8.0
"""FedAvg + DP at this ε must reach the pooled classical reference too."""


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
        "classical": arm.classical,
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
    """Cell key -> arm name -> :func:`summarise_arm`, with comparisons added."""
    out: dict[str, dict[str, Any]] = {}
    for cell in settings.cells():
        plan = settings.arms_for(cell)
        arms = {}
        for arm in plan:
            outcomes = [
                results[(cell.key, seed, arm.name)]
                for seed in settings.seeds_for(cell.patients)
                if (cell.key, seed, arm.name) in results
            ]
            arms[arm.name] = summarise_arm(arm, outcomes, labels)
        _compare(arms, plan)
        out[cell.key] = arms
    return out


def _compare(arms: dict[str, dict[str, Any]], plan: tuple[Arm, ...]) -> None:
    """Add each arm's ratio to pooled and how many sites beat their local-only model."""
    pooled = _auroc(arms, "pooled")
    classical = _auroc(arms, CLASSICAL_POOLED)
    for arm in plan:
        entry = arms[arm.name]
        if not entry.get("seeds"):
            continue
        local = arms.get("classical-local" if arm.classical else "local", {}).get(
            "per_site", {}
        )
        entry["ratio_to_pooled"] = ratio(entry["auroc"]["mean"], pooled)
        entry["minus_classical"] = entry["auroc"]["mean"] - classical
        per_site = {s: v["mean"] for s, v in entry["per_site"].items()}
        entry["worst_site"] = min(per_site.values()) if per_site else math.nan
        if arm.kind is ArmKind.FEDERATED and local:
            entry["sites_above_local"] = sum(
                per_site[s] > local[s]["mean"] for s in per_site if s in local
            )
            entry["sites"] = len(per_site)


def _auroc(arms: Mapping[str, Any], name: str) -> float:
    return arms.get(name, {}).get("auroc", {}).get("mean", math.nan)


def _dp_arm(arms: Mapping[str, Any], epsilon: float) -> dict[str, Any] | None:
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
            entry = _dp_arm(arms, eps)
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
                "pooled": _auroc(arms, "pooled"),
                "local": _auroc(arms, "local"),
                "classical": _auroc(arms, CLASSICAL_POOLED),
                "classical_dp": {
                    f"{eps:g}": _auroc(arms, f"classical-fedavg-dp-eps{eps:g}")
                    for eps in settings.epsilons
                },
                "fedavg": _auroc(arms, "fedavg"),
                "fedavg_ratio_to_pooled": arms.get("fedavg", {}).get(
                    "ratio_to_pooled", math.nan
                ),
                "dp": dp,
            }
        )
    return rows


def evaluate_goals(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]]
) -> list[Goal]:
    """The issues' learning-quality goals, per cell, with the numbers.

    - every cell of the primary base: FedAvg and FedProx ≥ 0.97 × pooled, and
      above every site's local-only model; fusion ≥ best single modality + 0.03;
    - at ``dp_goal_patients`` per site, primary base: FedAvg + DP at ε 8 and 3
      keep 0.90 and 0.85 of pooled without DP;
    - at ``local_goal_patients``, primary base: FedAvg + DP ε=8 above every site's
      local-only model (site by site);
    - per size: FedAvg on the pretrained base ≥ FedAvg on the random base.
    """
    goals: list[Goal] = []
    primary = settings.primary_base
    for cell in settings.cells():
        if cell.base != primary:
            continue
        arms = summary[cell.key]
        pooled = _auroc(arms, "pooled")
        plan = {a.name: a for a in settings.arms_for(cell)}
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
                    cell,
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
                        cell,
                        f"{arm.label}: every site's AUROC above its local-only model",
                        f"{entry['sites_above_local']} of {entry['sites']} sites",
                        float(entry["sites_above_local"]),
                        float(entry["sites"]),
                    )
                )
        goals += _fusion_goals(cell, arms, plan)
        goals += _personal_goals(cell, arms, plan)
    for cell in settings.cells():
        goals += _classical_goals(cell, summary.get(cell.key, {}))
    for n_sites in settings.ablation_site_counts:
        goals += _dp_pooled_goals(settings, summary, n_sites)
        goals += _dp_local_goals(settings, summary, n_sites)
        goals += _base_goals(settings, summary, n_sites)
    return sorted(goals, key=lambda g: (g.patients, g.sites))  # stable: by size


def _personal_goals(
    cell: Cell, arms: Mapping[str, Any], plan: Mapping[str, Arm]
) -> list[Goal]:
    """Personalised FedAvg: every site at or above FedAvg and its local-only model.

    Each on the site's own validation split.
    """
    goals = []
    fedavg = arms.get("fedavg", {}).get("per_site", {})
    local = arms.get("local", {}).get("per_site", {})
    for arm in plan.values():
        entry = arms.get(arm.name, {})
        if not arm.personal or not entry.get("seeds") or not fedavg or not local:
            continue
        per_site = {s: v["mean"] for s, v in entry["per_site"].items()}
        margins = {
            s: value - max(fedavg[s]["mean"], local[s]["mean"])
            for s, value in per_site.items()
            if s in fedavg and s in local
        }
        above = sum(m >= 0 for m in margins.values())
        worst = min(margins, key=margins.__getitem__)
        goals.append(
            at_least(
                "personal_above_global_and_local",
                cell,
                f"{arm.label}: every site at or above both FedAvg and its "
                "local-only model",
                f"{above} of {len(margins)} sites; smallest margin "
                f"{margins[worst]:+.3f} ({worst})",
                float(above),
                float(len(margins)),
            )
        )
    return goals


def _classical_goals(cell: Cell, arms: Mapping[str, Any]) -> list[Goal]:
    """The fusion model against the pooled classical reference, in every cell.

    Without DP, FedAvg's AUROC is at least the pooled classical model's; so is
    FedAvg + DP at ε=8 where the cell runs it.
    """
    classical = _auroc(arms, CLASSICAL_POOLED)
    if math.isnan(classical):
        return []
    goals = []
    candidates = [("FedAvg without DP", arms.get("fedavg"))]
    dp = _dp_arm(arms, CLASSICAL_DP_EPSILON)
    if dp is not None:
        candidates.append((f"FedAvg + DP ε={CLASSICAL_DP_EPSILON:g}", dp))
    for label, entry in candidates:
        if not entry or not entry.get("seeds"):
            continue
        value = entry["auroc"]["mean"]
        goals.append(
            at_least(
                "above_classical",
                cell,
                f"{label} ≥ the pooled classical reference's AUROC",
                f"{value:.3f} vs classical pooled {classical:.3f}: "
                f"{value - classical:+.3f}",
                value - classical,
                0.0,
            )
        )
    return goals


def _not_run(key: str, cell: Cell, goal: str, why: str) -> Goal:
    return at_least(key, cell, goal, why, math.nan, None)


def _dp_pooled_goals(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]], n_sites: int
) -> list[Goal]:
    cell = Cell(settings.dp_goal_patients, n_sites, settings.primary_base)
    goals = []
    for eps, share in DP_VS_POOLED:
        goal = (
            f"FedAvg + DP ε={eps:g} ≥ {share:g} × pooled AUROC without DP (same base)"
        )
        if cell.key not in summary:
            goals.append(
                _not_run(
                    "dp_vs_pooled",
                    cell,
                    goal,
                    f"not run: no {cell.patients:,}-patient federation in this study",
                )
            )
            continue
        arms = summary[cell.key]
        entry = _dp_arm(arms, eps)
        if entry is None:
            why = (
                "no result: the arm failed"
                if eps in settings.epsilons
                else f"not run: ε={eps:g} is not one of this study's ε"
            )
            goals.append(_not_run("dp_vs_pooled", cell, goal, why))
            continue
        goals.append(
            at_least(
                "dp_vs_pooled",
                cell,
                goal,
                f"{entry['auroc']['mean']:.3f} vs pooled {_auroc(arms, 'pooled'):.3f}: "
                f"{entry['ratio_to_pooled']:.3f}×",
                entry["ratio_to_pooled"],
                share,
            )
        )
    return goals


def _dp_local_goals(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]], n_sites: int
) -> list[Goal]:
    cell = Cell(settings.local_goal_patients, n_sites, settings.primary_base)
    eps = DP_ABOVE_LOCAL_EPSILON
    goal = (
        f"FedAvg + DP ε={eps:g}: every site's AUROC above its local-only model "
        "(without DP)"
    )
    arms = summary.get(cell.key)
    entry = _dp_arm(arms, eps) if arms is not None else None
    local = (arms or {}).get("local", {})
    if entry is None or not local.get("seeds"):
        return [
            _not_run(
                "dp_above_local",
                cell,
                goal,
                f"not run: no {cell.patients:,}-patient DP ε={eps:g} and local-only "
                "results",
            )
        ]
    margins = {
        site: value["mean"] - local["per_site"][site]["mean"]
        for site, value in entry["per_site"].items()
        if site in local["per_site"]
    }
    above = sum(m > 0 for m in margins.values())
    worst = min(margins, key=margins.__getitem__)
    return [
        at_least(
            "dp_above_local",
            cell,
            goal,
            f"{above} of {len(margins)} sites; smallest margin {margins[worst]:+.3f} "
            f"({worst}: {entry['per_site'][worst]['mean']:.3f} vs local-only "
            f"{local['per_site'][worst]['mean']:.3f})",
            float(above),
            float(len(margins)),
        )
    ]


def _base_goals(
    settings: StudySettings, summary: Mapping[str, Mapping[str, Any]], n_sites: int
) -> list[Goal]:
    """FedAvg without DP on the pretrained base vs on the random base, per size."""
    pretrained = settings.primary_base
    if pretrained == RANDOM_BASE or RANDOM_BASE not in settings.bases:
        return []
    goals = []
    for patients in settings.patients:
        cell = Cell(patients, n_sites, pretrained)
        other = Cell(patients, n_sites, RANDOM_BASE)
        goal = (
            f"FedAvg without DP on the {base_label(pretrained)} base ≥ on the random "
            "base"
        )
        if cell.key not in summary or other.key not in summary:
            continue
        mine, theirs = (
            _auroc(summary[cell.key], "fedavg"),
            _auroc(summary[other.key], "fedavg"),
        )
        goals.append(
            at_least(
                "pretrained_vs_random",
                cell,
                goal,
                f"{mine:.3f} vs random {theirs:.3f}: {mine - theirs:+.3f}",
                mine - theirs,
                0.0,
            )
        )
    return goals


def _fusion_goals(
    cell: Cell, arms: Mapping[str, Any], plan: Mapping[str, Arm]
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
        and not a.classical
        and not a.personal
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
                cell,
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
