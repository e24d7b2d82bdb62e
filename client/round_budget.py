"""A round's privacy budget at a site: reserved before training, committed after.

The ledger reserves the round's planned mechanism under its lock, after checking
that neither the run's epsilon limit nor the site's lifetime budget would be
passed; a crash from then on counts as spent. After training the steps taken are
committed and the epsilon spent becomes the reply's privacy metrics.
"""

from __future__ import annotations

import functools
from typing import Any

from ..common import wire
from ..common.config import Accountant
from ..common.privacy import Mechanism, check_round_budget, epsilon_spent
from .ledger import project
from .privacy_policy import DpPlan
from .runtime import SiteRuntime


def reserve_round(
    runtime: SiteRuntime, plan: DpPlan, run: str, server_round: int
) -> str:
    """Reserve the round's planned privacy spend; the reservation's id."""
    # Checked and made durable under one lock, before any noisy step: a crash
    # from here on counts as spent.
    return runtime.ledger.reserve(
        run,
        server_round,
        plan.per_round,
        delta=plan.delta,
        max_grad_norm=plan.training.max_grad_norm,
        accountant=plan.accountant.value,
        base_model=runtime.built.base_fingerprint,
        admit=functools.partial(admit_round, plan, runtime, run),
    )


def commit_round(
    runtime: SiteRuntime, plan: DpPlan, run: str, reservation: str, steps: int
) -> dict[str, Any]:
    """Record the steps taken in the ledger; the privacy metrics of the reply."""
    ledger = runtime.ledger
    # The reservation still counts its planned steps (>= those taken): the
    # reported epsilon never understates what the commit below records.
    run_history = ledger.history(run)
    eps_run = epsilon_spent(run_history, plan.delta, plan.accountant)
    eps_total = epsilon_spent(
        ledger.history(), plan.lifetime_delta, plan.lifetime_accountant
    )
    # Written before the update leaves the site.
    ledger.commit(reservation, steps, epsilon_run=eps_run, epsilon_total=eps_total)
    return {
        wire.DP_EPSILON_RUN: eps_run,
        # PRV falls back to the RDP bound where it cannot evaluate a history
        wire.DP_EPSILON_RUN_PRV: epsilon_spent(run_history, plan.delta, Accountant.PRV),
        wire.DP_EPSILON_TOTAL: eps_total,
        wire.DP_EPSILON_BUDGET: runtime.site.privacy.budget_epsilon,
        wire.DP_DELTA: plan.delta,
        wire.DP_NOISE_MULTIPLIER: plan.per_round.noise_multiplier,
        wire.DP_SAMPLE_RATE: plan.per_round.sample_rate,
        wire.DP_STEPS: steps,
        wire.DP_MAX_GRAD_NORM: plan.training.max_grad_norm,
    }


def admit_round(
    plan: DpPlan,
    runtime: SiteRuntime,
    run: str | None,
    recorded: list[tuple[str, Mechanism]],
) -> None:
    """Refuse (under the ledger's lock) a round past the run's or the site's limit."""
    run_after, total_after = project(
        recorded,
        plan.per_round,
        run,
        run_delta=plan.delta,
        lifetime_delta=plan.lifetime_delta,
        accountant=plan.accountant,
        lifetime_accountant=plan.lifetime_accountant,
    )
    check_round_budget(
        run_after,
        total_after,
        max_epsilon_per_run=plan.run_epsilon_limit,
        budget_epsilon=runtime.site.privacy.budget_epsilon,
    )


def check_round_ahead(runtime: SiteRuntime, plan: DpPlan, run_id: str | None) -> None:
    """Refuse a round that would take the run or the site past its epsilon limit.

    A check ahead of time (SecAgg+ setup); the binding one is made under the
    ledger's lock with the reservation.
    """
    admit_round(plan, runtime, run_id, runtime.ledger.recorded())
