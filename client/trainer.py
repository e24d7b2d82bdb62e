"""Local training and evaluation at a site (plain SGD loop; DP wraps it).

One loop for every model family: an :class:`~.objectives.Objective` says how items
become a batch and what a batch's loss is (the mean of per-example losses, as
Opacus's per-sample clipping expects), and evaluates; the default is the fusion
classifier's. Randomness comes from an explicit generator seeded per (run seed,
site, round), so a site's round is reproducible.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..common.config import OptimizerKind, RunConfig
from ..common.recipe import training_recipe
from .dp import (
    DpTraining,
    check_rows_per_example,
    clipped_backward,
    is_empty_batch,
    private_training,
)
from .frozen_features import hold_frozen_parts_in_eval
from .objectives import INPUT_KEYS, EvalOutcome, FusionObjective, Objective
from .proximal import add_proximal_gradient, proximal_term, snapshot_trainable

__all__ = [
    "INPUT_KEYS",
    "EvalOutcome",
    "LocalTrainSpec",
    "TrainOutcome",
    "evaluate",
    "train_local",
]


@dataclass(frozen=True)
class LocalTrainSpec:
    """What one round of local training does."""

    epochs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    proximal_mu: float
    seed: int
    modality_dropout: float = 0.0
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    """AdamW, or SGD with ``momentum``: under DP-SGD's noise a fresh AdamW turns
    every noisy step into a full learning-rate step."""
    momentum: float = 0.9
    wide_lr_scale: float = 1.0
    """The fusion model's wide term trains at ``learning_rate × wide_lr_scale``."""
    cache_frozen_features: bool = True
    """Read a frozen encoder part's embeddings from a per-run cache
    (:mod:`.frozen_features`; ``train.cache-frozen-features``)."""

    @classmethod
    def from_config(
        cls, config: RunConfig, *, seed: int, proximal_mu: float, patients: int
    ) -> LocalTrainSpec:
        """The round's spec from the run config's recipe.

        ``patients``: the site's training patients (the DP batch is a share of them).
        """
        recipe = training_recipe(config)
        return cls(
            epochs=config.train.local_epochs,
            max_steps=config.train.max_steps,
            batch_size=recipe.batch_for(patients),
            learning_rate=recipe.learning_rate,
            weight_decay=config.train.weight_decay,
            proximal_mu=proximal_mu,
            seed=seed,
            modality_dropout=config.train.modality_dropout,
            optimizer=recipe.optimizer,
            momentum=recipe.momentum,
            wide_lr_scale=recipe.wide_lr_scale,
            cache_frozen_features=config.train.cache_frozen_features,
        )


@dataclass(frozen=True)
class TrainOutcome:
    """Numbers from a round of local training."""

    num_examples: int
    steps: int
    mean_loss: float
    seconds: float


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_local(
    model: torch.nn.Module,
    dataset: Dataset,
    spec: LocalTrainSpec,
    dp: DpTraining | None = None,
    objective: Objective | None = None,
) -> TrainOutcome:
    """Train the model's trainable tensors on ``dataset``; FedProx term when mu > 0.

    With ``dp``, every step is a DP-SGD step (Opacus, Poisson sampling of the
    dataset's patients, one study per sampled patient); the FedProx gradient is
    data-independent and is added after the noise, at no privacy cost. ``steps``
    counts sampling steps, empty Poisson batches included (they are skipped, but
    accounted). Without ``dp`` every study is used, shuffled. ``objective`` defaults to
    the fusion classifier's; a fusion objective drops modalities at
    ``spec.modality_dropout``, whatever it was built with.
    """
    start = time.perf_counter()
    objective = _round_objective(objective, spec)
    dataset = objective.prepare(model, dataset)
    generator = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=objective.collate,
    )
    optimizer = make_optimizer(param_groups(model, spec), spec)
    anchor = snapshot_trainable(model) if spec.proximal_mu > 0 else {}
    model.train()
    # A part that does not train is a fixed function of its input, with or without
    # the cache: no dropout, and no batch statistics mixing a DP batch's examples.
    hold_frozen_parts_in_eval(model)
    if dp is None:
        counts = _run_epochs(
            model, model, optimizer, loader, spec, anchor, generator, objective
        )
    else:
        with private_training(model, optimizer, loader, dp, seed=spec.seed) as parts:
            counts = _run_epochs(
                model,
                parts.model,
                parts.optimizer,
                parts.loader,
                spec,
                anchor,
                generator,
                objective,
                ghost=parts.ghost,
            )
    steps, loss_sum, seen = counts
    return TrainOutcome(
        num_examples=len(dataset),  # type: ignore[arg-type]  # map-style datasets are sized
        steps=steps,
        mean_loss=loss_sum / max(seen, 1),
        seconds=time.perf_counter() - start,
    )


def _round_objective(objective: Objective | None, spec: LocalTrainSpec) -> Objective:
    """The objective with the round's modality dropout and feature cache.

    Fusion only: the other families have no modalities to hide. The cache is used
    when both the objective and the spec allow it.
    """
    if objective is None:
        objective = FusionObjective()
    if isinstance(objective, FusionObjective):
        return replace(
            objective,
            modality_dropout=spec.modality_dropout,
            frozen_features=objective.frozen_features and spec.cache_frozen_features,
        )
    return objective


def param_groups(model: torch.nn.Module, spec: LocalTrainSpec) -> list[dict[str, Any]]:
    """The trainable tensors: the wide term's at its own learning rate, then the rest."""
    wide: list[torch.nn.Parameter] = []
    deep: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (wide if ".wide." in f".{name}" else deep).append(param)
    groups: list[dict[str, Any]] = [{"params": deep}] if deep else []
    if wide:
        groups.append({"params": wide, "lr": spec.learning_rate * spec.wide_lr_scale})
    return groups


def make_optimizer(
    params: list[torch.nn.Parameter] | list[dict], spec: LocalTrainSpec
) -> torch.optim.Optimizer:
    """The round's optimizer over the trainable tensors (fresh every round)."""
    if spec.optimizer is OptimizerKind.SGD:
        return torch.optim.SGD(
            params,
            lr=spec.learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.AdamW(
        params, lr=spec.learning_rate, weight_decay=spec.weight_decay
    )


def _run_epochs(
    model: torch.nn.Module,
    forward_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    spec: LocalTrainSpec,
    anchor: dict[str, torch.Tensor],
    generator: torch.Generator,
    objective: Objective,
    *,
    ghost: bool = False,
) -> tuple[int, float, int]:
    private = hasattr(optimizer, "pre_step")  # an Opacus DPOptimizer
    device = _model_device(model)
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(spec.epochs):
        for batch in loader:
            steps += 1
            if is_empty_batch(batch):
                if private:
                    # The analysed mechanism releases noise on an empty draw too;
                    # skipping would make the step's outcome depend on who is in
                    # the data beyond what the accountant counts.
                    optimizer.zero_grad(set_to_none=True)
                    _private_step(
                        model, optimizer, spec, anchor, empty=True, ghost=ghost
                    )
                # An empty draw is a step all the same: the budget was checked
                # for max-steps of them, so the limit stops here too.
                if spec.max_steps and steps >= spec.max_steps:
                    return steps, loss_sum, seen
                continue
            batch = objective.to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            if ghost:
                example_losses = objective.example_losses(
                    forward_model, batch, generator
                )
                loss = example_losses.detach().mean()
            else:
                loss = objective.loss(forward_model, batch, generator)
            if private:
                with warnings.catch_warnings():
                    # Opacus's hooks on a fusion module whose inputs (frozen
                    # encoders' outputs) need no gradient: expected, per step.
                    warnings.filterwarnings(
                        "ignore",
                        message="Full backward hook is firing",
                        category=UserWarning,
                    )
                    if ghost:
                        clipped_backward(forward_model, optimizer, example_losses)
                    else:
                        loss.backward()
                check_rows_per_example(
                    forward_model,
                    optimizer,
                    objective.num_examples(batch),
                    ghost=ghost,
                )
                _private_step(model, optimizer, spec, anchor)
            else:
                total = loss
                if spec.proximal_mu > 0:
                    trainable = (
                        (n, p) for n, p in model.named_parameters() if p.requires_grad
                    )
                    total = loss + proximal_term(trainable, anchor, spec.proximal_mu)
                total.backward()
                optimizer.step()
            examples = objective.num_examples(batch)
            loss_sum += float(loss.detach()) * examples
            seen += examples
            if spec.max_steps and steps >= spec.max_steps:
                return steps, loss_sum, seen
    return steps, loss_sum, seen


def _private_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: LocalTrainSpec,
    anchor: dict[str, torch.Tensor],
    *,
    empty: bool = False,
    ghost: bool = False,
) -> None:
    """Opacus's step: clip per example, add noise, average; then FedProx's term.

    ``empty``: a Poisson draw of no patient, whose step is noise alone (per-example
    gradients of zero examples, as Opacus's own empty batches give; under ghost
    clipping, a clipped sum of zero).
    """
    # Opacus's DPOptimizer: torch's Optimizer type does not know it.
    dp_optimizer: Any = optimizer
    if empty:
        for param in dp_optimizer.params:
            if ghost:
                param.grad = torch.zeros_like(param)
            else:
                param.grad_sample = param.new_zeros((0, *param.shape))
    if dp_optimizer.pre_step():
        if spec.proximal_mu > 0:
            add_proximal_gradient(model, anchor, spec.proximal_mu)
        dp_optimizer.original_optimizer.step()


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    objective: Objective | None = None,
) -> EvalOutcome:
    """Evaluate on ``dataset`` (default: the fusion classifier's loss and AUROC)."""
    return (objective or FusionObjective()).evaluate(model, dataset, batch_size)
