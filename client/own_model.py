"""Personalised sites by a model of their own (``federation.own-model-weight``).

Beside the global adapter it trains and sends, a site trains a model of its own on
its patients alone: one round of local training per round of the run it trains,
starting from the adapter the site built from the approved run config (nothing a
coordinator sent is in it). That model never leaves the site, and it moves only
in a round whose answer passed the egress guard. The site evaluates with the
mixture of the two models' probabilities, ``w · own + (1 − w) · global``, with
the share ``w`` fixed by the run. The own model is, in effect, the site's
local-only model: this is an output ensemble of it and the global model, not a
model trained for the mixture (APFL, Deng et al. 2020, mixes parameters and
trains the local part through the mix).
A site that has not trained yet evaluates the global model alone.

The mixing itself (:func:`mixed_outcome`) is pure; loading and training are the
caller's (``client.app``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from ..common.adapter import load_adapter_state
from ..common.errors import ConfigError
from .metrics import auroc_per_label, macro_auroc, mean_log_loss
from .objectives import EvalOutcome, FusionObjective, Objective


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def mixture_log_probabilities(
    global_logits: np.ndarray, own_logits: np.ndarray, own_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """Log P(positive) and log P(negative) of ``w · own + (1 − w) · global``.

    Mixed in log space: a probability rounded to 0 or 1 would make a confident
    miss cost a clipped loss rather than the one its logits say.
    """
    with np.errstate(divide="ignore"):  # log 0 = −inf: a share of 0 or 1
        log_w, log_rest = np.log(own_weight), np.log(1.0 - own_weight)
    log_p = np.logaddexp(
        log_w + _log_sigmoid(own_logits), log_rest + _log_sigmoid(global_logits)
    )
    log_q = np.logaddexp(
        log_w + _log_sigmoid(-own_logits), log_rest + _log_sigmoid(-global_logits)
    )
    return log_p, log_q


def mixed_outcome(
    global_logits: np.ndarray,
    own_logits: np.ndarray,
    labels: np.ndarray,
    own_weight: float,
    seconds: float,
) -> EvalOutcome:
    """Loss and AUROC of the probabilities ``w · own + (1 − w) · global``."""
    log_p, log_q = mixture_log_probabilities(global_logits, own_logits, own_weight)
    per_label = auroc_per_label(labels, np.exp(log_p))
    return EvalOutcome(
        num_examples=len(labels),
        loss=mean_log_loss(labels, log_p, log_q),
        auroc_macro=macro_auroc(per_label),
        auroc_per_label=per_label,
        seconds=seconds,
    )


def evaluate_mixture(
    model: torch.nn.Module,
    own_state: Mapping[str, np.ndarray],
    dataset: Dataset,
    batch_size: int,
    objective: Objective,
    own_weight: float,
) -> tuple[EvalOutcome, bool]:
    """Evaluate the adapter ``model`` holds mixed with the site's own model.

    Returns the outcome and whether the own model was in it: one whose outputs
    hold a NaN or an infinity is left out (the outcome is the global model's
    alone), for the caller to start it again. Leaves ``model`` holding the site's
    own model (the next message loads its adapter anew).
    """
    if not isinstance(objective, FusionObjective):
        raise ConfigError(
            "federation.own-model-weight applies to the fusion family only",
            hint="Set federation.own-model-weight = 0.",
        )
    start = time.perf_counter()
    global_logits, labels = objective.predict_logits(model, dataset, batch_size)
    load_adapter_state(model, own_state)
    own_logits, _ = objective.predict_logits(model, dataset, batch_size)
    if not np.isfinite(own_logits).all():
        alone = mixed_outcome(
            global_logits, global_logits, labels, 0.0, time.perf_counter() - start
        )
        return alone, False
    outcome = mixed_outcome(
        global_logits, own_logits, labels, own_weight, time.perf_counter() - start
    )
    return outcome, True
