"""Quantization settings for SecAgg+ derived from the delta bound, and the error bound.

Flower's SecAgg+ (client side) multiplies each site's vector ``x`` by its weight
``r = round(n / M * T) / T`` (``n`` examples, ``M`` = max weight), clips every
coordinate to ``[-C, C]``, quantizes stochastically to integers in ``[0, T]`` and
masks them modulo ``2**32``. The server unmasks the sum, dequantizes and divides by
the sum of the weights: the result is the weighted mean of the ``x``.

Sites clip their delta to an L2 norm of at most ``B`` before it leaves, so every
coordinate satisfies ``|x_j| <= B``; with ``C = B`` and ``n <= M`` nothing is ever
clipped by the quantizer. The two remaining errors, per coordinate, with ``k`` sites:

* stochastic rounding: below one quantum ``2C/T`` per site, so the sum is off by
  less than ``2kC/T`` and the mean by less than ``2kC / (T * sum r)``;
* weight rounding: ``|r - n/M| <= 1/(2T)`` moves the mean by at most
  ``kB / (T * sum r)``.

So ``|secure mean - exact weighted mean| <= (2kC + kB) / (T * sum r)`` per coordinate,
plus float32 rounding of the result (``B * 2**-23``). ``T`` is the largest power of
two with ``(k + 1) * T <= 2**32`` (no overflow of the masked sums) and at most
``2**30`` (Flower quantizes into int32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODULUS_RANGE = 2**32
MIN_PARTICIPANTS = 3
"""Fewest SecAgg+ participants a site masks among (itself included): Flower derives
each pairwise mask from a 32-bit seed, so with 2 the one mask a coordinator does not
learn at unmask is a 2**32 search away."""
_MAX_QUANTIZATION_RANGE = 2**30


@dataclass(frozen=True)
class QuantizationPlan:
    """The SecAgg+ settings for one round."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float


def plan_quantization(
    delta_bound: float, num_sites: int, max_examples: int
) -> QuantizationPlan:
    """Settings for ``num_sites`` deltas of L2 norm <= ``delta_bound``.

    ``max_examples`` is the largest example count among the sampled sites (sites
    cap their weight at it), so the largest weight is 1 and the error bound small.
    """
    if delta_bound <= 0:
        raise ValueError("secure aggregation needs a positive delta bound")
    levels = MODULUS_RANGE // (max(num_sites, 1) + 1)
    quantization_range = min(1 << (levels.bit_length() - 1), _MAX_QUANTIZATION_RANGE)
    return QuantizationPlan(
        clipping_range=float(delta_bound),
        quantization_range=quantization_range,
        modulus_range=MODULUS_RANGE,
        max_weight=float(max(max_examples, 1)),
    )


def quantized_weight(num_examples: int, plan: QuantizationPlan) -> float:
    """The weight SecAgg+ gives a site: its capped example share, rounded to 1/T."""
    ratio = min(num_examples, plan.max_weight) / plan.max_weight
    return round(ratio * plan.quantization_range) / plan.quantization_range


def mean_error_bound(
    plan: QuantizationPlan, num_sites: int, delta_bound: float, weight_sum: float
) -> float:
    """Largest per-coordinate gap between the secure and the exact weighted mean."""
    if weight_sum <= 0:
        return float("inf")
    k, c, t = num_sites, plan.clipping_range, plan.quantization_range
    return (2 * k * c + k * delta_bound) / (t * weight_sum) + delta_bound * 2.0**-23


def largest_honest_mean_norm(
    plan: QuantizationPlan,
    num_sites: int,
    delta_bound: float,
    weight_sum: float,
    coordinates: int,
    slack: float,
) -> float:
    """The largest L2 norm the secure mean can have when every site clipped.

    The mean is a weighted average of deltas of norm at most ``delta_bound``
    (``slack``: float32 rounding of an honest clip), so its norm is at most that
    too, plus the quantization error on each of ``coordinates``. SecAgg+ itself
    bounds each coordinate only (the clipping range): a site that skipped the
    clip shows here.
    """
    error = mean_error_bound(plan, num_sites, delta_bound, weight_sum)
    return delta_bound * (1.0 + slack) + math.sqrt(coordinates) * error


def count_or_fraction(value: float) -> int | float:
    """A ``[secure-aggregation]`` value as Flower reads it: int a count, float a fraction."""
    return float(value) if value <= 1.0 else int(value)


@dataclass(frozen=True)
class ShareCounts:
    """The key shares of one SecAgg+ round, as Flower's workflow sets them."""

    num_shares: int
    threshold: int


def share_counts(
    num_shares: float, reconstruction_threshold: float, participants: int
) -> ShareCounts:
    """What ``SecAggPlusWorkflow`` announces at setup for ``participants`` sites.

    Mirrors Flower 1.41's ``setup_stage``: a fractional ``num_shares`` is rounded
    and made odd (below the participant count), and raised to all participants if
    that leaves 2 or fewer; a fractional threshold is taken of the shares, at least 2.
    """
    shares_setting = count_or_fraction(num_shares)
    if isinstance(shares_setting, float):
        shares = round(shares_setting * participants)
        if shares < participants and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = participants
    else:
        shares = shares_setting
    threshold_setting = count_or_fraction(reconstruction_threshold)
    if isinstance(threshold_setting, float):
        threshold = max(round(threshold_setting * shares), 2)
    else:
        threshold = threshold_setting
    return ShareCounts(num_shares=shares, threshold=threshold)
