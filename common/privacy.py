"""DP-SGD accounting arithmetic (Opacus accountants), no file I/O.

One local round of DP-SGD at a site is the Poisson-subsampled Gaussian mechanism
(sample rate ``q``, noise multiplier ``σ``) applied ``steps`` times (Abadi et al.,
2016). Rounds compose: a site's privacy loss is the composition of every round it
ever trained, so sigma is planned once for the run's whole schedule and epsilon is
always computed over the full recorded history, never per round. The history
format is Opacus's: ``(noise_multiplier, sample_rate, num_steps)``.

Epsilon comes from Opacus's RDP accountant (Mironov, 2017) or its PRV accountant
(Gopi et al., 2021; tighter, numerical). Both return upper bounds, so falling back
from PRV to RDP is always safe, only looser.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from .config import Accountant
from .errors import ConfigError, PrivacyBudgetExhausted

log = logging.getLogger(__name__)

PRV_MAX_MECHANISMS = 8
"""PRV convolves one discretised PRV per distinct (σ, q); its cost grows with that
count. Measured (Opacus 1.6, one CPU, ε≈1.5–2): 8 distinct mechanisms 2.8 s, 16 →
5.6 s, 50 → 19 s; at ε≈36–95, 10 → 9 s, 20 → 53 s, 50 → 347 s. Beyond this count
the RDP bound is used."""

DOMAIN_FORMULA_OF_OPACUS = "1.6."
"""The Opacus release whose PRV domain bound ``_prv_accountant_class`` reproduces."""

PRV_MAX_EPSILON = 100.0
"""PRV's grid grows with ε (its domain is bounded by RDP's ε at δ/4000): planning
to ε=200 took 118 s and ε=1000 ran out of memory (343M-point grid). Beyond this
RDP epsilon, PRV is not attempted; at that level the tighter bound is moot."""


@dataclass(frozen=True)
class Mechanism:
    """The subsampled Gaussian mechanism applied ``steps`` times (one round)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise multiplier must be > 0, got {self.noise_multiplier}"
            )
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, Integral):
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass(frozen=True)
class LocalSchedule:
    """Sampling rate and DP-SGD steps of one local round at a site."""

    sample_rate: float
    steps_per_round: int


def local_schedule(
    num_examples: int, batch_size: int, local_epochs: int, max_steps: int
) -> LocalSchedule:
    """The round's sampling as Opacus's ``DPDataLoader.from_data_loader`` does it.

    Opacus replaces a loader of ``k = ceil(n / batch_size)`` batches by Poisson
    sampling at ``q = 1 / k`` (not ``batch_size / n``: the two agree when
    ``batch_size`` divides ``n``, otherwise ``1 / k`` is the smaller and is what the
    mechanism really uses) and yields ``int(1 / q)`` batches per epoch. That is
    ``k`` except where ``1 / (1 / k)`` rounds below ``k`` in floating point
    (k = 93, 99, 105, ...): there Opacus draws one batch fewer, and so does this.
    ``max_steps > 0`` caps the round's steps.
    """
    if num_examples <= 0:
        raise ConfigError(
            "this site has no training examples, so DP-SGD has nothing to sample",
            hint="Check the site's data (train split) before joining a run.",
        )
    if batch_size <= 0 or local_epochs <= 0 or max_steps < 0:
        raise ConfigError(
            f"train.batch-size ({batch_size}) and train.local-epochs ({local_epochs}) "
            f"must be >= 1 and train.max-steps ({max_steps}) >= 0"
        )
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps = local_epochs * int(1 / sample_rate)
    if max_steps > 0:
        steps = min(steps, max_steps)
    return LocalSchedule(sample_rate=sample_rate, steps_per_round=steps)


@functools.lru_cache(maxsize=64)
def plan_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: Accountant,
) -> float:
    """Sigma such that ``total_steps`` steps at ``sample_rate`` spend at most the target.

    ``total_steps`` is the run's whole schedule (rounds x steps per round): a sigma
    planned per round would let every round spend the full target. Opacus's
    binary search stops within 0.01 below the target. With PRV and a target above
    ``PRV_MAX_EPSILON``, sigma is planned with RDP instead (larger sigma, so PRV's
    epsilon stays below the target). Measured on one CPU: RDP 0.01–13 s (slowest
    at q≈0.5), PRV 0.5–33 s for targets 1–50 and 49–86 s at 100. Answers are
    cached: the search is pure in its arguments, and runs with the same schedule
    (a study's DP arms, a run restarted in the same process) ask it again.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if total_steps <= 0:
        raise ConfigError(f"the run plans {total_steps} DP-SGD steps; it needs >= 1")
    used = accountant
    if accountant is Accountant.PRV and target_epsilon > PRV_MAX_EPSILON:
        log.warning(
            "target epsilon %s is above %s: sigma planned with RDP, not PRV",
            target_epsilon,
            PRV_MAX_EPSILON,
        )
        used = Accountant.RDP
    try:
        with warnings.catch_warnings():
            # The search starts at large sigmas, whose small epsilon is best bounded
            # at Opacus's largest order (see _rdp_epsilon): a valid bound, and no
            # message for a site.
            warnings.filterwarnings(
                "ignore", message="Optimal order is the largest alpha"
            )
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=used.value,
                epsilon_tolerance=0.01,
            )
        return float(sigma)
    except ValueError as err:
        raise ConfigError(
            f"no noise multiplier reaches epsilon {target_epsilon:g} at delta "
            f"{target_delta:g} over {total_steps} steps at sample rate "
            f"{sample_rate:.4g} ({used.value} accountant): {err}",
            hint="Raise privacy.target-epsilon, or plan fewer steps (fewer "
            "federation.rounds, train.local-epochs or a train.max-steps cap). RDP "
            "cannot certify epsilon below about 0.2 at all; PRV can.",
        ) from err


def merge_history(history: Sequence[Mechanism]) -> list[tuple[float, float, int]]:
    """Opacus history with equal (σ, q) entries merged and zero-step ones dropped.

    Composition is commutative, so ``n1`` then ``n2`` steps of one mechanism are
    ``n1 + n2`` steps of it: exact for RDP, and PRV composes each distinct
    mechanism with itself by one FFT power. Order of first appearance is kept.
    """
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps > 0:
            key = (float(m.noise_multiplier), float(m.sample_rate))
            steps[key] = steps.get(key, 0) + m.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon_spent(
    history: Sequence[Mechanism], delta: float, accountant: Accountant
) -> float:
    """Epsilon at ``delta`` of the composition of every mechanism in ``history``.

    0.0 for an empty history. PRV is used when the merged history has at most
    ``PRV_MAX_MECHANISMS`` distinct mechanisms and an RDP epsilon of at most
    ``PRV_MAX_EPSILON``, and when it succeeds; otherwise the RDP bound is returned
    and a warning logged (RDP is a valid, looser upper bound).
    """
    entries = merge_history(history)
    if not entries:
        return 0.0
    return _epsilon_of(tuple(entries), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_of(
    entries: tuple[tuple[float, float, int], ...], delta: float, accountant: Accountant
) -> float:
    # Pure in its arguments: a site asks the same question before and after a round
    # (projection, commit, report), so answers are kept.
    history = list(entries)
    rdp_eps = _rdp_epsilon(entries, delta)
    if accountant is not Accountant.PRV:
        return rdp_eps
    if len(entries) > PRV_MAX_MECHANISMS or not rdp_eps <= PRV_MAX_EPSILON:
        log.warning(
            "PRV accounting skipped (%d distinct mechanisms, RDP epsilon %.3g; limits "
            "%d and %g): using the RDP bound",
            len(entries),
            rdp_eps,
            PRV_MAX_MECHANISMS,
            PRV_MAX_EPSILON,
        )
        return rdp_eps
    prv_eps = _prv_epsilon(history, delta)
    if prv_eps is None:
        return rdp_eps
    return prv_eps


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """One step's RDP at Opacus's default orders, for one (q, σ).

    Opacus computes a history's RDP as each mechanism's one-step RDP times its
    steps, summed; the one-step vector is the costly part (a series per fractional
    order) and does not change as a run's steps grow, so it is kept.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(
        compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=RDPAccountant.DEFAULT_ALPHAS,
        )
    )


def _rdp_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` of ``entries`` (σ, q, steps).

    From the kept one-step vectors: the same products and the same sum as Opacus's,
    so the same bits.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(
        [np.asarray(_rdp_per_step(q, sigma)) * steps for sigma, q, steps in entries]
    )
    with warnings.catch_warnings():
        # At very small ε the best order is Opacus's largest: the bound is still
        # valid (only not the tightest), and the ledger keeps Opacus's orders so its
        # numbers stay Opacus's. Not a message for a site's operator.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(eps)


@functools.cache
def _prv_accountant_class() -> Any:
    """Opacus's PRV accountant class, its domain sized from the kept one-step RDP vectors.

    Opacus sizes the PRV's discretisation domain (``compute_safe_domain_size``) with
    fresh RDP accountants: the one-step series of :func:`_rdp_per_step`, computed
    anew on every call. That was 0.55 s of a site's 0.63 s per-round PRV epsilon
    (σ 0.97, q 1/7), paid again by every site of a simulation. The bound below is
    Opacus 1.6's formula on the same RDP epsilons, so the same bits;
    ``tests/unit/test_privacy_math.py`` compares the result with Opacus's own.
    Another Opacus release may size the domain otherwise: it gets its own accountant.
    """
    from importlib.metadata import version

    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    if not version("opacus").startswith(DOMAIN_FORMULA_OF_OPACUS):
        return PRVAccountant

    class KeptRdpPRVAccountant(PRVAccountant):  # type: ignore[misc]  # untyped Opacus
        def _get_domain(
            self,
            prvs: list[Any],
            num_self_compositions: list[int],
            eps_error: float,
            delta_error: float,
        ) -> Any:
            total = sum(num_self_compositions)
            composed = tuple(
                (p.noise_multiplier, p.sample_rate, n)
                for p, n in zip(prvs, num_self_compositions, strict=True)
            )
            largest = _rdp_epsilon(composed, delta_error / 4)
            for p in prvs:
                one_step = ((p.noise_multiplier, p.sample_rate, 1),)
                largest = max(
                    largest, _rdp_epsilon(one_step, delta_error / (8 * total))
                )
            half_width = max(largest, eps_error) + 3
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-half_width, half_width, mesh_size)

    return KeptRdpPRVAccountant


def _prv_epsilon(entries: list[tuple[float, float, int]], delta: float) -> float | None:
    import numpy as np

    prv = _prv_accountant_class()()
    prv.history = entries
    try:
        # q = 1 takes log(0) inside Opacus's PRV; the result is still right.
        with np.errstate(divide="ignore"):
            eps = float(prv.get_epsilon(delta))
    except (ArithmeticError, ValueError, RuntimeError, MemoryError):
        log.warning("PRV accountant failed: using the RDP bound", exc_info=True)
        return None
    if not math.isfinite(eps) or eps < 0:
        log.warning("PRV accountant returned epsilon %s: using the RDP bound", eps)
        return None
    return eps


def check_round_budget(
    run_eps_after: float,
    total_eps_after: float,
    *,
    max_epsilon_per_run: float,
    budget_epsilon: float,
    run_eps_before: float | None = None,
    total_eps_before: float | None = None,
) -> None:
    """Refuse a round that would take the run or the site past its epsilon limit.

    ``*_after`` are the epsilons with the round added (what the site would have
    spent once it trains); ``*_before`` (optional) are those without it, for the
    message. A non-finite epsilon is refused. Every exceeded limit is named.
    """
    problems = []
    checks = (
        ("this run", run_eps_before, run_eps_after, max_epsilon_per_run,
         "the per-run maximum"),
        ("this site over all runs", total_eps_before, total_eps_after,
         budget_epsilon, "the site's lifetime budget (privacy.budget-epsilon)"),
    )  # fmt: skip
    for scope, before, after, limit, name in checks:
        if math.isfinite(after) and after <= limit:
            continue
        spent = "" if before is None else f"spent so far {before:.3f}, "
        problems.append(
            f"{scope}: {spent}epsilon after this round would be {after:.3f}, above "
            f"{name} of {limit:.3f}"
        )
    if problems:
        raise PrivacyBudgetExhausted(
            "this site does not train this round: " + "; ".join(problems),
            hint="Raise privacy.budget-epsilon in site.toml only if your governance "
            "allows it; start a new run with a smaller target epsilon or fewer "
            "rounds.",
        )
