"""The site's privacy decisions: does it accept the run's DP settings, with what sigma.

The run config asks (target epsilon and delta, clip norm, planned rounds); the
site's ``[privacy]`` section in ``site.toml`` is a floor no run can lower. Sigma is
planned once for the run's whole schedule (rounds x local steps, Poisson sampling).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..common.config import Accountant, PrivacyConfig, RunConfig, SecureMode
from ..common.errors import PrivacyPolicyRefused
from ..common.privacy import Mechanism, local_schedule
from ..common.recipe import training_recipe
from ..ops.cache_dir import cache_root
from ..sitedata.site_config import SitePrivacy
from .dp import DpTraining
from .sigma_cache import planned_sigma

DEFAULT_LIFETIME_DELTA = 1e-5
"""The lifetime budget's delta when ``[privacy] max-delta`` is not set (or 1 / the
training patients, if smaller): never looser than the runs it composes, which may
use up to 1 / patients."""


@dataclass(frozen=True)
class DpPlan:
    """What DP-SGD means at this site for this run."""

    per_round: Mechanism
    """The mechanism one round of local training applies."""
    delta: float
    """The run's delta: its own epsilon is reported and capped at it."""
    lifetime_delta: float
    """The site's delta (its floor, never the run's): the lifetime budget composes
    every run at it."""
    accountant: Accountant
    lifetime_accountant: Accountant
    """The site's accountant for its lifetime budget (its floor, never the run's)."""
    run_epsilon_limit: float
    """A round that would take this run past it is refused: the run's target, or
    the site's per-run maximum if lower."""
    training: DpTraining


def plan_site_privacy(
    config: RunConfig, floor: SitePrivacy, num_train: int, *, simulation: bool
) -> DpPlan | None:
    """The site's DP plan for ``config``; None when the run trains without DP.

    Raises PrivacyPolicyRefused when the run asks for less privacy than ``floor``.
    """
    return _plan(
        config.model_dump_json(), floor.model_dump_json(), num_train, simulation
    )


_HINT = (
    "Ask the coordinator for a run within this site's floor, or change "
    "[privacy] in site.toml if your governance allows it."
)


@functools.lru_cache(maxsize=32)
def _plan(
    config_json: str, floor_json: str, num_train: int, simulation: bool
) -> DpPlan | None:
    config = RunConfig.model_validate(json.loads(config_json))
    floor = SitePrivacy.model_validate(json.loads(floor_json))
    privacy = config.privacy
    if not privacy.enabled:
        if floor.required:
            raise PrivacyPolicyRefused(
                "this site requires DP-SGD and the run has privacy.enabled = false",
                hint=_HINT,
            )
        return None
    schedule = local_schedule(
        num_train,
        training_recipe(config).batch_for(num_train),
        config.train.local_epochs,
        config.train.max_steps,
    )
    # The machine's cache: the sites of a simulation plan each schedule once.
    sigma = planned_sigma(
        privacy.target_epsilon,
        privacy.target_delta,
        schedule.sample_rate,
        # a repeatable round is one more release the run's epsilon must cover
        schedule.steps_per_round
        * (config.federation.rounds + config.federation.repeatable_rounds),
        privacy.accountant,
        cache_root() / "sigma",
    )
    secure = privacy.secure_mode is SecureMode.ON or (
        privacy.secure_mode is SecureMode.AUTO and not simulation
    )
    reasons = _below_floor(privacy, floor, num_train, sigma)
    if not secure and not simulation:
        reasons.append(
            "the run turns secure noise off (privacy.secure-mode = 'off'); outside "
            "a simulation this site draws its noise only from seeds the operating "
            "system's CSPRNG makes, never from values the coordinator knows"
        )
    if reasons:
        raise PrivacyPolicyRefused(
            "the run asks for less privacy than this site allows: "
            + "; ".join(reasons),
            hint=_HINT,
        )
    return DpPlan(
        per_round=Mechanism(
            noise_multiplier=sigma,
            sample_rate=schedule.sample_rate,
            steps=schedule.steps_per_round,
        ),
        delta=privacy.target_delta,
        lifetime_delta=(
            floor.max_delta
            if floor.max_delta is not None
            else min(DEFAULT_LIFETIME_DELTA, 1.0 / num_train)
        ),
        accountant=privacy.accountant,
        lifetime_accountant=floor.accountant,
        run_epsilon_limit=min(privacy.target_epsilon, floor.max_epsilon) * (1 + 1e-6),
        training=DpTraining(
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            grad_sample_mode=privacy.grad_sample_mode,
            secure_mode=secure,
        ),
    )


def settings_below_floor(config: RunConfig, floor: SitePrivacy) -> list[str]:
    """What the floor refuses in the run's settings alone, before any data is read.

    For ``site approve``: the limits that depend on the site's training patients
    (the default delta limit, the planned sigma) are checked when the run trains.
    """
    if not config.privacy.enabled:
        return (
            ["this site requires DP-SGD and the run has privacy.enabled = false"]
            if floor.required
            else []
        )
    return _below_floor(config.privacy, floor, None, None)


def _below_floor(
    privacy: PrivacyConfig,
    floor: SitePrivacy,
    num_train: int | None,
    sigma: float | None,
) -> list[str]:
    """Where the run's epsilon, delta or planned sigma falls short of the floor.

    Without ``num_train`` (and ``sigma``) only what the settings alone decide.
    """
    reasons = []
    if privacy.target_epsilon > floor.max_epsilon:
        reasons.append(
            f"the run targets epsilon {privacy.target_epsilon:g} and this site allows "
            f"at most {floor.max_epsilon:g} per run (privacy.max-epsilon)"
        )
    max_delta = (
        floor.max_delta
        if floor.max_delta is not None
        else (1.0 / num_train if num_train else 1.0)
    )
    if privacy.target_delta > max_delta:
        # The refusal reaches the coordinator: the default limit (1 / patients)
        # would tell it the site's patient count, so that one is not quoted.
        reasons.append(
            f"the run's delta {privacy.target_delta:g} is above this site's limit "
            + (
                f"{max_delta:g} (privacy.max-delta)"
                if floor.max_delta is not None
                else "(1 / its number of training patients; privacy.max-delta sets "
                "another)"
            )
        )
    if sigma is not None and sigma < floor.min_noise_multiplier:
        reasons.append(
            f"the run's schedule gives noise multiplier {sigma:.3f}, below this "
            f"site's minimum {floor.min_noise_multiplier:g} "
            "(privacy.min-noise-multiplier)"
        )
    return reasons
