"""Personalised sites by a model of their own (``federation.own-model-weight``).

Beside the global adapter it trains and sends, a site trains a model of its own on
its patients alone: one round of local training per round of the run, starting
from the first global adapter it receives. That model never leaves the site. The
site evaluates with the mixture of the two models' probabilities,
``w · own + (1 − w) · global`` — the output mixture of APFL (Deng et al., "Adaptive
Personalized Federated Learning", 2020), with the share ``w`` fixed by the run
rather than learned, since learning it would need data the site does not train on.
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
from .metrics import auroc_per_label, macro_auroc, mean_bce
from .objectives import EvalOutcome, FusionObjective, Objective


def mixed_outcome(
    global_scores: np.ndarray,
    own_scores: np.ndarray,
    labels: np.ndarray,
    own_weight: float,
    seconds: float,
) -> EvalOutcome:
    """Loss and AUROC of ``own_weight · own + (1 − own_weight) · global``."""
    mixed = own_weight * own_scores + (1.0 - own_weight) * global_scores
    per_label = auroc_per_label(labels, mixed)
    return EvalOutcome(
        num_examples=len(labels),
        loss=mean_bce(labels, mixed),
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
) -> EvalOutcome:
    """Evaluate the adapter ``model`` holds mixed with the site's own model.

    Leaves ``model`` holding the site's own model (the next message loads its
    adapter anew).
    """
    if not isinstance(objective, FusionObjective):
        raise ConfigError(
            "federation.own-model-weight applies to the fusion family only",
            hint="Set federation.own-model-weight = 0.",
        )
    start = time.perf_counter()
    global_scores, labels = objective.predict(model, dataset, batch_size)
    load_adapter_state(model, own_state)
    own_scores, _ = objective.predict(model, dataset, batch_size)
    return mixed_outcome(
        global_scores, own_scores, labels, own_weight, time.perf_counter() - start
    )
