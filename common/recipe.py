"""The training recipe a run config resolves to: with DP-SGD, and without.

Keys left at ``auto`` / 0 in ``[train]`` and ``model.trainable`` take the recipe's
value; keys the run sets win. The DP recipe was chosen by measurement on
synthetic hospitals (docs/privacy.md, "Why this recipe"): under DP-SGD the noise
grows with the number of trained tensors and a fresh AdamW turns every noisy step
into a full-size step, so DP trains only the fusion module and head, on the
base's features, with SGD with momentum and larger batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import OptimizerKind, RunConfig, TrainableScope


@dataclass(frozen=True)
class TrainingRecipe:
    """What local training does, every ``auto`` resolved."""

    trainable: TrainableScope
    optimizer: OptimizerKind
    learning_rate: float
    batch_size: int
    momentum: float


PLAIN = TrainingRecipe(
    trainable=TrainableScope.ALL,
    optimizer=OptimizerKind.ADAMW,
    learning_rate=5e-3,
    batch_size=16,
    momentum=0.9,
)
"""Without DP-SGD (and for the ``vlm`` family)."""

PRIVATE = TrainingRecipe(
    trainable=TrainableScope.FUSION,
    optimizer=OptimizerKind.SGD,
    learning_rate=0.1,
    batch_size=64,
    momentum=0.9,
)
"""Under DP-SGD, for the ``fusion`` family."""


def training_recipe(config: RunConfig) -> TrainingRecipe:
    """The recipe of ``config``: the DP or plain defaults, overridden by set keys."""
    private = config.privacy.enabled and config.model.family == "fusion"
    defaults = PRIVATE if private else PLAIN
    train = config.train
    trainable = config.model.trainable
    optimizer = train.optimizer
    return TrainingRecipe(
        trainable=defaults.trainable if trainable is TrainableScope.AUTO else trainable,
        optimizer=defaults.optimizer if optimizer is OptimizerKind.AUTO else optimizer,
        learning_rate=train.learning_rate or defaults.learning_rate,
        batch_size=train.batch_size or defaults.batch_size,
        momentum=train.momentum,
    )
