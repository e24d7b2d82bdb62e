"""Local training and evaluation at a site (plain SGD loop; DP wraps it).

Randomness comes from an explicit generator seeded per (run seed, site, round), so
a site's round is reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.transforms import drop_modalities
from .dp import DpTraining, is_empty_batch, private_training
from .metrics import auroc_per_label, macro_auroc
from .proximal import add_proximal_gradient, proximal_term, snapshot_trainable

INPUT_KEYS = ("image", "ehr", "note_ids", "note_mask", "present")


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


@dataclass(frozen=True)
class TrainOutcome:
    """Numbers from a round of local training."""

    num_examples: int
    steps: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class EvalOutcome:
    """Numbers from evaluating on the site's validation split."""

    num_examples: int
    loss: float
    auroc_macro: float
    auroc_per_label: np.ndarray
    seconds: float


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: batch[k] for k in INPUT_KEYS})


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(
    batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_local(
    model: torch.nn.Module,
    dataset: Dataset,
    spec: LocalTrainSpec,
    dp: DpTraining | None = None,
) -> TrainOutcome:
    """Train the model's trainable tensors on ``dataset``; FedProx term when mu > 0.

    With ``dp``, every step is a DP-SGD step (Opacus, Poisson sampling); the
    FedProx gradient is data-independent and is added after the noise, at no
    privacy cost. ``steps`` counts sampling steps, empty Poisson batches included
    (they are skipped, but accounted).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(
        dataset, batch_size=spec.batch_size, shuffle=True, generator=generator
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    anchor = snapshot_trainable(model) if spec.proximal_mu > 0 else {}
    model.train()
    if dp is None:
        counts = _run_epochs(model, model, optimizer, loader, spec, anchor, generator)
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
            )
    steps, loss_sum, seen = counts
    return TrainOutcome(
        num_examples=len(dataset),
        steps=steps,
        mean_loss=loss_sum / max(seen, 1),
        seconds=time.perf_counter() - start,
    )


def _run_epochs(
    model: torch.nn.Module,
    forward_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    spec: LocalTrainSpec,
    anchor: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> tuple[int, float, int]:
    private = hasattr(optimizer, "pre_step")  # an Opacus DPOptimizer
    loss_fn = torch.nn.BCEWithLogitsLoss()
    device = _model_device(model)
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(spec.epochs):
        for batch in loader:
            steps += 1
            if is_empty_batch(batch):
                continue
            if spec.modality_dropout > 0:
                batch = drop_modalities(batch, spec.modality_dropout, generator)
            batch = _to(batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(_forward(forward_model, batch), batch["labels"])
            if private:
                loss.backward()
                if optimizer.pre_step():  # clip per example, add noise, average
                    if spec.proximal_mu > 0:
                        add_proximal_gradient(model, anchor, spec.proximal_mu)
                    optimizer.original_optimizer.step()
            else:
                total = loss
                if spec.proximal_mu > 0:
                    trainable = (
                        (n, p) for n, p in model.named_parameters() if p.requires_grad
                    )
                    total = loss + proximal_term(trainable, anchor, spec.proximal_mu)
                total.backward()
                optimizer.step()
            loss_sum += float(loss.detach()) * len(batch["labels"])
            seen += len(batch["labels"])
            if spec.max_steps and steps >= spec.max_steps:
                return steps, loss_sum, seen
    return steps, loss_sum, seen


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int) -> EvalOutcome:
    """Loss and AUROC (per label and macro) on ``dataset``."""
    start = time.perf_counter()
    model.eval()
    device = _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    all_scores, all_labels, loss_sum = [], [], 0.0
    for batch in loader:
        batch = _to(batch, device)
        logits = _forward(model, batch)
        loss_sum += float(loss_fn(logits, batch["labels"]))
        all_scores.append(torch.sigmoid(logits).float().cpu().numpy())
        all_labels.append(batch["labels"].cpu().numpy())
    n = len(dataset)
    if n == 0:
        return EvalOutcome(
            0, float("nan"), float("nan"), np.array([]), time.perf_counter() - start
        )
    labels, scores = np.concatenate(all_labels), np.concatenate(all_scores)
    per_label = auroc_per_label(labels, scores)
    return EvalOutcome(
        num_examples=n,
        loss=loss_sum / (n * labels.shape[1]),
        auroc_macro=macro_auroc(per_label),
        auroc_per_label=per_label,
        seconds=time.perf_counter() - start,
    )
