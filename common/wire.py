"""The wire contract: record keys and metric names that cross between site and coordinator.

Only the adapter delta (float32 tensors of the declared trainable modules), numeric
metrics and a few fixed configuration values cross. Never raw data, strings taken
from data, or pickles (Flower serialises arrays with ``allow_pickle=False``).
"""

from __future__ import annotations

from enum import StrEnum

# Record keys (RecordDict entries)
GLOBAL_ADAPTER = "arrays"
"""ArrayRecord: the global adapter *weights* sent to sites (Flower's default key)."""
ADAPTER_DELTA = "delta"
"""ArrayRecord: a site's adapter *delta* (trained - global), float32."""
CONFIG = "config"
METRICS = "metrics"


class PayloadKind(StrEnum):
    """What an ArrayRecord holds."""

    WEIGHTS = "weights"
    DELTA = "delta"


# Train/evaluate config keys the coordinator sends
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx sets
BASE_FINGERPRINT = "base-model-fingerprint"
PAYLOAD_KIND = "payload-kind"

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
