"""The wire contract: record keys and metric names that cross between site and coordinator.

Only the adapter delta (the declared trainable modules' tensors, packed into one
array: :mod:`wardround.common.packing`), numeric metrics and a few fixed
configuration values cross. Never raw data, strings taken
from data, or pickles (Flower serialises arrays with ``allow_pickle=False``).
"""

from __future__ import annotations

from enum import StrEnum

WIRE_VERSION = 2
"""The wire contract's version. 2: each adapter travels as one packed float32 array
(:mod:`wardround.common.packing`); 1 (unversioned) sent one array per tensor."""

# Record keys (RecordDict entries)
GLOBAL_ADAPTER = "arrays"
"""ArrayRecord: the global adapter *weights* sent to sites (Flower's default key)."""
ADAPTER_DELTA = "delta"
"""ArrayRecord: a site's adapter *delta* (trained - global), packed."""
PACKED_ADAPTER = "adapter"
"""The one array of an adapter ArrayRecord: the tensors packed in layout order."""
CONFIG = "config"
METRICS = "metrics"


class PayloadKind(StrEnum):
    """What an ArrayRecord holds."""

    WEIGHTS = "weights"
    DELTA = "delta"


# Train/evaluate config keys the coordinator sends
SERVER_ROUND = "server-round"


def round_number(value: object) -> int | None:
    """A message's ``server-round`` as every part of the site reads it, or None.

    An int, or a float that holds one (Flower's records keep both), of at most
    :data:`MAX_ROUND_NUMBER`; not a bool, a fraction, NaN or infinity, which the
    coordinator could send as well.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and abs(value) <= MAX_ROUND_NUMBER:
        return value
    return None


MAX_ROUND_NUMBER = 2**31 - 1
"""Beyond any run's rounds: a larger number (1e300 as a float) is no round at all,
and would otherwise be written out digit by digit in the site's logs."""


PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx sets
BASE_FINGERPRINT = "base-model-fingerprint"
PAYLOAD_KIND = "payload-kind"
RUN_ID = "run-id"  # the coordinator's run id, for the site's privacy ledger
AGGREGATION = "aggregation"  # an Aggregation value
SECAGG_MAX_WEIGHT = "secagg-max-weight"  # sites cap their example count at this
WIRE_VERSION_KEY = "wire-version"  # in every message (the site checks it) and every
# reply's metrics (the coordinator reads it on plain train replies)
ADAPTER_LAYOUT = "adapter-layout"  # AdapterLayout.digest of the global adapter sent


class Aggregation(StrEnum):
    """How the coordinator combined the deltas of a round."""

    PLAIN = "plain"
    SECAGG_PLUS = "secagg+"


# Metric keys sites send (numbers only)
NUM_EXAMPLES = "num-examples"  # the key Flower's strategies weight by
SITE_INDEX = "site-index"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"
DELTA_L2 = "delta-l2"
EVAL_LOSS = "eval-loss"
AUROC_MACRO = "auroc-macro"
AUROC_PREFIX = "auroc."  # + run label name (from the run config, never from data)
EVAL_SECONDS = "eval-seconds"
TRAIN_EXAMPLES = (
    "train-examples"  # evaluate replies: training-set size (SecAgg+ weights)
)
DELTA_CLIPPED = "delta-clipped"  # 1 when the delta was scaled down to the L2 bound

# Generative (vlm family) evaluation, per site; generated text itself never leaves
EVAL_PERPLEXITY = "eval-perplexity"  # exp(mean answer-token NLL) on validation
EVAL_GENERATED = "eval-generated"  # validation examples generated for
EXACT_MATCH = "exact-match"  # share of closed questions answered exactly
TEXT_OVERLAP = "text-overlap-chrf"  # corpus chrF (0-100) of generated vs reference
LABEL_AGREEMENT = "label-agreement"  # findings read from generated reports vs labels
GENERATIVE_METRICS = (
    EVAL_PERPLEXITY,
    EVAL_GENERATED,
    EXACT_MATCH,
    TEXT_OVERLAP,
    LABEL_AGREEMENT,
)

# Differential privacy, per site per round (numbers only)
DP_EPSILON_RUN = "dp-epsilon-run"  # epsilon this run has spent at the site (accountant)
DP_EPSILON_RUN_PRV = "dp-epsilon-run-prv"  # the same from the PRV accountant
DP_EPSILON_TOTAL = "dp-epsilon-total"  # over every run in the site's ledger
DP_EPSILON_BUDGET = "dp-epsilon-budget"  # the site's lifetime budget (its site.toml)
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_MAX_GRAD_NORM = "dp-max-grad-norm"

ACCOUNTING_METRICS = (
    DP_EPSILON_RUN,
    DP_EPSILON_RUN_PRV,
    DP_EPSILON_TOTAL,
    DP_EPSILON_BUDGET,
    DP_DELTA,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    DP_MAX_GRAD_NORM,
)
"""Numeric privacy accounting: functions of the site's plan, not of its data; it
always leaves (the coordinator shows every site's spend)."""

# The site's wardround release, as numbers (metrics carry no strings)
VERSION_MAJOR = "wardround-version-major"
VERSION_MINOR = "wardround-version-minor"
VERSION_PATCH = "wardround-version-patch"
VERSION_METRICS = (VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH)
"""Sent with every reply so the coordinator can tell which release each site runs; a
site's answer policy may leave them out."""

PROTOCOL_METRICS = (WIRE_VERSION_KEY,)
"""Sent with every reply whatever the site's answer policy: the coordinator reads a
delta only in the wire version it speaks."""

METRIC_NAMES = (
    NUM_EXAMPLES,
    SITE_INDEX,
    TRAIN_LOSS,
    TRAIN_STEPS,
    TRAIN_SECONDS,
    DELTA_L2,
    DELTA_CLIPPED,
    EVAL_LOSS,
    AUROC_MACRO,
    EVAL_SECONDS,
    TRAIN_EXAMPLES,
    *ACCOUNTING_METRICS,
    *GENERATIVE_METRICS,
    *VERSION_METRICS,
    *PROTOCOL_METRICS,
)
"""Every metric name a site may send (plus ``AUROC_PREFIX`` + a run label)."""

AUROC_PER_LABEL = AUROC_PREFIX + "*"
"""A site's answer policy names per-label AUROC with this one entry."""

COUNT_METRICS = (NUM_EXAMPLES, TRAIN_EXAMPLES, EVAL_GENERATED)
"""Example counts: they leave rounded up to the site's count granularity (the
number generated is the validation split's size when that is the smaller)."""

PER_SITE_TRAINING_METRICS = (TRAIN_LOSS, TRAIN_SECONDS, DELTA_L2, DELTA_CLIPPED)
"""What a round's training says about one site's data beyond its update. Under
SecAgg+ the coordinator sees only the sum of the updates, so these stay home
(aggregate-only); in plain rounds they leave if the site's policy lists them."""

OUTSIDE_DP_TRAINING_METRICS = (TRAIN_LOSS, TRAIN_SECONDS)
"""What a round's training computes from its patients outside DP-SGD's clipping and
noise: the mean loss of the sampled studies (a crafted adapter makes it any
statistic of them) and the time (it follows the secret Poisson batch sizes). A DP
round keeps them at the site whatever the policy lists; what else leaves is the
noised update, functions of it (``delta-l2``, ``delta-clipped``) and of the plan."""

ANSWERABLE_METRICS = tuple(
    m for m in METRIC_NAMES if m not in ACCOUNTING_METRICS + PROTOCOL_METRICS
) + (AUROC_PER_LABEL,)
"""Names a site's answer policy (``[answers] metrics``) may list."""

DEFAULT_ANSWER_METRICS = ANSWERABLE_METRICS
"""By default every schema metric may leave (rounded, counts coarsened); a site
narrows the list in ``site.toml``."""
