"""The study's learning-quality goals, checked on its summary (pure).

Each goal is a :class:`~.stats.Goal`: what was asked, what was measured, and
whether it was met (``None``: reported only, or not measured).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ...common.config import Modality
from .catalog import Arm, ArmGroup, ArmKind
from .cells import RANDOM_BASE, Cell, base_label
from .plan import StudySettings
from .stats import Goal, at_least
from .summary import (
    CLASSICAL_POOLED,
    SITE_AUROC_DECIMALS,
    against_best_single,
    arm_auroc,
    dp_arm,
    site_margin,
)

FEDERATED_VS_POOLED = 0.97
DP_VS_POOLED = ((8.0, 0.90), (3.0, 0.85))
"""(ε, least share of pooled AUROC without DP) at ``dp_goal_patients`` per site."""
DP_ABOVE_LOCAL_EPSILON = 8.0
"""At ``local_goal_patients`` per site, DP FedAvg at this ε beats every site's
local-only model (trained without DP)."""
FUSION_MARGIN = 0.03
CLASSICAL_DP_EPSILON = 8.0
"""FedAvg + DP at this ε must reach the pooled classical reference too."""


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
        pooled = arm_auroc(arms, "pooled")
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
        goals += _personal_goals(cell, arms, plan, settings.site_decimals)
    for cell in settings.cells():
        goals += _classical_goals(cell, summary.get(cell.key, {}))
    for n_sites in settings.ablation_site_counts:
        goals += _dp_pooled_goals(settings, summary, n_sites)
        goals += _dp_local_goals(settings, summary, n_sites)
        goals += _base_goals(settings, summary, n_sites)
    return sorted(goals, key=lambda g: (g.patients, g.sites))  # stable: by size


def _personal_goals(
    cell: Cell,
    arms: Mapping[str, Any],
    plan: Mapping[str, Arm],
    decimals: Mapping[str, int],
) -> list[Goal]:
    """Personalised FedAvg: every site at or above FedAvg and its local-only model.

    Each on the site's own validation split.
    """
    goals = []
    fedavg = arms.get("fedavg", {}).get("per_site", {})
    local = arms.get("local", {}).get("per_site", {})
    for arm in plan.values():
        entry = arms.get(arm.name, {})
        if not arm.personalised or not entry.get("seeds") or not fedavg or not local:
            continue
        per_site = {s: v["mean"] for s, v in entry["per_site"].items()}
        margins, unmeasured = _measured(
            {
                s: site_margin(
                    value,
                    max(fedavg[s]["mean"], local[s]["mean"]),
                    decimals.get(s, SITE_AUROC_DECIMALS),
                )
                for s, value in per_site.items()
                if s in fedavg and s in local
            }
        )
        goal = (
            f"{arm.label}: every site at or above both FedAvg and its local-only model"
        )
        if not margins:
            goals.append(
                _not_run(
                    "personal_above_global_and_local",
                    cell,
                    goal,
                    _unmeasured(unmeasured),
                )
            )
            continue
        above = sum(m >= 0 for m in margins.values())
        worst = min(margins, key=margins.__getitem__)
        goals.append(
            at_least(
                "personal_above_global_and_local",
                cell,
                goal,
                f"{above} of {len(margins)} sites; smallest margin "
                f"{margins[worst]:+.3f} ({worst})" + _also_unmeasured(unmeasured),
                float(above),
                float(len(margins)),
            )
        )
    return goals


def _classical_goals(cell: Cell, arms: Mapping[str, Any]) -> list[Goal]:
    """The fusion model against the classical reference, in every cell.

    Without DP, FedAvg's AUROC is at least the pooled classical model's; so is
    FedAvg + DP at ε=8 where the cell runs it. Under DP the like-for-like bar is
    the classical model trained the same way (FedAvg + DP at the same ε): it is
    reported beside the pooled one.
    """
    classical = arm_auroc(arms, CLASSICAL_POOLED)
    if math.isnan(classical):
        return []
    goals = _classical_dp_goal(cell, arms)
    candidates = [("FedAvg without DP", arms.get("fedavg"))]
    dp = dp_arm(arms, CLASSICAL_DP_EPSILON)
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


def _classical_dp_goal(cell: Cell, arms: Mapping[str, Any]) -> list[Goal]:
    """FedAvg + DP at ε=8 against the classical FedAvg + DP at ε=8."""
    eps = CLASSICAL_DP_EPSILON
    dp = dp_arm(arms, eps)
    reference = arm_auroc(arms, f"classical-fedavg-dp-eps{eps:g}")
    if dp is None or math.isnan(reference):
        return []
    value = dp["auroc"]["mean"]
    return [
        at_least(
            "above_classical_dp",
            cell,
            f"FedAvg + DP ε={eps:g} ≥ the classical FedAvg + DP ε={eps:g}",
            f"{value:.3f} vs classical {reference:.3f}: {value - reference:+.3f}",
            value - reference,
            0.0,
        )
    ]


def _measured(margins: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """The sites whose margin is a number, and those without one.

    A site's AUROC is undefined where its validation split lacks positives or
    negatives of every finding: it is neither above nor below.
    """
    finite = {s: m for s, m in margins.items() if math.isfinite(m)}
    return finite, sorted(s for s in margins if s not in finite)


_NOT_MEASURABLE = (
    "AUROC undefined on its validation split: no finding has both positive and "
    "negative studies there"
)


def _unmeasured(sites: list[str]) -> str:
    return f"not measurable at any site ({', '.join(sites)}: {_NOT_MEASURABLE})"


def _also_unmeasured(sites: list[str]) -> str:
    if not sites:
        return ""
    return f"; not measurable, left out: {', '.join(sites)} ({_NOT_MEASURABLE})"


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
        entry = dp_arm(arms, eps)
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
                f"{entry['auroc']['mean']:.3f} vs pooled {arm_auroc(arms, 'pooled'):.3f}: "
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
    entry = dp_arm(arms, eps) if arms is not None else None
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
    margins, unmeasured = _measured(
        {
            site: site_margin(
                value["mean"],
                local["per_site"][site]["mean"],
                settings.site_decimals.get(site, SITE_AUROC_DECIMALS),
            )
            for site, value in entry["per_site"].items()
            if site in local["per_site"]
        }
    )
    if not margins:
        return [_not_run("dp_above_local", cell, goal, _unmeasured(unmeasured))]
    above = sum(m > 0 for m in margins.values())
    worst = min(margins, key=margins.__getitem__)
    return [
        at_least(
            "dp_above_local",
            cell,
            goal,
            f"{above} of {len(margins)} sites; smallest margin {margins[worst]:+.3f} "
            f"({worst}: {entry['per_site'][worst]['mean']:.3f} vs local-only "
            f"{local['per_site'][worst]['mean']:.3f})" + _also_unmeasured(unmeasured),
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
            arm_auroc(summary[cell.key], "fedavg"),
            arm_auroc(summary[other.key], "fedavg"),
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
        a.modalities[0].value: arms[a.name]
        for a in plan.values()
        if a.group is ArmGroup.MODALITY
        and len(a.modalities) == 1
        and math.isfinite(arm_auroc(arms, a.name))
    }
    if len(singles) < len(Modality):
        return []
    fused = [
        a
        for a in plan.values()
        if a.kind is ArmKind.FEDERATED
        and not a.classical
        and not a.personalised
        and len(a.modalities) == len(Modality)
        and a.epsilon is None
        and not a.secure_aggregation
        and a.strategy.value == "fedavg"
        and arms[a.name].get("seeds")
    ]
    goals = []
    for arm in fused:
        best = against_best_single(arms[arm.name], singles)
        if best is None:
            continue
        name, single, fused_auroc = best
        unscored = singles[name].get("unscored_sites") or {}
        # a single modality is scored only where a site has it: the fused model
        # is compared with it on those sites
        where = (
            f" (on the sites with it; not {', '.join(sorted(unscored))})"
            if unscored
            else ""
        )
        margin = fused_auroc - single
        goals.append(
            at_least(
                "fused_vs_best_single",
                cell,
                f"fused ({arm.fusion.value}) ≥ best single modality + {FUSION_MARGIN}",
                f"{fused_auroc:.3f} vs {name} only {single:.3f}{where}: {margin:+.3f}",
                margin,
                FUSION_MARGIN,
            )
        )
    return goals
