"""What a model family trains for: batching, the loss, and evaluation.

The trainer (:mod:`.trainer`) is one loop for every family; an :class:`Objective`
supplies the family-specific parts. Every loss is the **mean of per-example
losses**: Opacus clips one gradient per example and scales by the batch size, so
an example's loss must not depend on the other examples of its batch.
"""

from __future__ import annotations

import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..sitedata.transforms import drop_modalities
from .metrics import auroc_per_label, labels_or_unknown, macro_auroc

if TYPE_CHECKING:
    from ..common.config import RunConfig
    from ..models import BuiltModel

INPUT_KEYS = (
    "image",
    "ehr",
    "note_ids",
    "note_mask",
    "present",
    "note_ngrams",
    "features",
)
"""The fusion model's inputs (``labels`` is the target), in the order of its
``forward`` parameters. ``features`` (the frozen part's embeddings) is in a batch
only when the trainer cached them (:mod:`.frozen_features`)."""
OPTIONAL_INPUTS = ("features",)


def label_known(batch: dict[str, Any]) -> torch.Tensor:
    """1 per (example, label) pair whose label the site knows, else 0.

    0 where the site's cell was empty or unmapped; every pair is known in a batch
    without a ``label_known`` mask.
    """
    known = batch.get("label_known")
    return torch.ones_like(batch["labels"]) if known is None else known


def pair_bce(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """BCE of each (example, label) pair, [B, labels]."""
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, batch["labels"], reduction="none"
    )


def example_bce(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Each example's BCE over the labels its site knows, per label of the task, [B].

    An unknown label is left out rather than trained as a negative, which would
    teach the model that an unrecorded finding is absent. Dividing by the task's
    label count, not the known ones, keeps every known (example, label) pair at
    the weight it has in a fully labelled example. An example with no known label
    has loss 0: under DP-SGD it adds nothing but its place in the sample.
    """
    return (pair_bce(logits, batch) * label_known(batch)).mean(dim=1)


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The fusion model's logits for ``batch``, its inputs passed positionally.

    Positional because Opacus's ``ew`` wrapper (``grad-sample-mode = 'ew'``) has
    ``forward(x, *args, **kwargs)`` and takes the batch size from ``x``: a keyword
    call fails there, and every other wrapper passes positions through as well.
    """
    inputs = (batch.get(k) if k in OPTIONAL_INPUTS else batch[k] for k in INPUT_KEYS)
    return cast(torch.Tensor, model(*inputs))


@dataclass(frozen=True)
class EvalOutcome:
    """Numbers from evaluating on the site's validation split."""

    num_examples: int
    loss: float
    auroc_macro: float
    auroc_per_label: np.ndarray
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    """Further numbers under their wire names (``common.wire``), e.g. perplexity."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Generated texts with their references: kept at the site, never sent."""


class Objective(Protocol):
    """The family-specific parts of local training and evaluation."""

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Items -> one batch (the DataLoader's ``collate_fn``)."""

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The batch on the model's device."""

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Mean over the batch's examples of each example's own loss."""

    def example_losses(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Each example's own loss, ``[batch]`` (ghost clipping clips by them)."""

    def num_examples(self, batch: dict[str, Any]) -> int:
        """How many examples (records) the batch holds."""

    def prepare(self, model: torch.nn.Module, dataset: Dataset) -> Dataset:
        """The dataset training and evaluation read (a cache of what never changes)."""

    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, batch_size: int
    ) -> EvalOutcome:
        """Validation numbers for the current model."""


def tensors_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (no copy on the CPU)."""
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


@dataclass(frozen=True)
class FusionObjective:
    """The ``fusion`` family: multi-label BCE over findings, AUROC on validation."""

    modality_dropout: float = 0.0
    """Chance to hide each present modality of a training example."""
    frozen_features: bool = True
    """Read a frozen encoder part's embeddings from a per-run cache where the model
    allows it (:mod:`.frozen_features`)."""

    @classmethod
    def for_run(cls, config: RunConfig, built: BuiltModel) -> FusionObjective:
        """The run's objective (the family registry's entry)."""
        return cls(
            modality_dropout=config.train.modality_dropout,
            frozen_features=config.train.cache_frozen_features,
        )

    def prepare(self, model: torch.nn.Module, dataset: Dataset) -> Dataset:
        """``dataset`` with the frozen part's embeddings, where they can be cached."""
        if not self.frozen_features:
            return dataset
        from .frozen_features import with_frozen_features

        return with_frozen_features(model, dataset)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Stack the items' tensors."""
        return default_collate(items)

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """See :class:`Objective`."""
        return tensors_to(batch, device)

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The mean of the examples' BCEs (:func:`example_bce`)."""
        if self.modality_dropout > 0:
            batch = drop_modalities(batch, self.modality_dropout, generator)
        # A mean over examples, as Opacus's hooks assume (loss_reduction "mean"):
        # a denominator counting the batch's known pairs would tie one example's
        # gradient to the others' labels.
        return example_bce(forward(model, batch), batch).mean()

    def example_losses(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Each example's BCE (:func:`example_bce`); the same dropout draws."""
        if self.modality_dropout > 0:
            batch = drop_modalities(batch, self.modality_dropout, generator)
        return example_bce(forward(model, batch), batch)

    def num_examples(self, batch: dict[str, Any]) -> int:
        """See :class:`Objective`."""
        return len(batch["labels"])

    @torch.no_grad()
    def predict_logits(
        self, model: torch.nn.Module, dataset: Dataset, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each study's logits and its labels (NaN: unknown), [n, labels]."""
        model.eval()
        device = next(model.parameters()).device
        loader = DataLoader(
            self.prepare(model, dataset), batch_size=batch_size, shuffle=False
        )
        all_scores, all_labels = [], []
        for batch in loader:
            batch = tensors_to(batch, device)
            all_scores.append(forward(model, batch).double().cpu().numpy())
            all_labels.append(
                labels_or_unknown(
                    batch["labels"].cpu().numpy(), label_known(batch).cpu().numpy()
                )
            )
        if not all_scores:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return np.concatenate(all_scores), np.concatenate(all_labels)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: Dataset, batch_size: int
    ) -> EvalOutcome:
        """Loss and AUROC (per label and macro) on ``dataset``."""
        start = time.perf_counter()
        model.eval()
        device = next(model.parameters()).device
        dataset = self.prepare(model, dataset)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        all_scores, all_labels, loss_sum, pairs = [], [], 0.0, 0.0
        for batch in loader:
            batch = tensors_to(batch, device)
            logits = forward(model, batch)
            known = label_known(batch)
            loss_sum += float((pair_bce(logits, batch) * known).sum())
            pairs += float(known.sum())
            all_scores.append(torch.sigmoid(logits).float().cpu().numpy())
            all_labels.append(
                labels_or_unknown(batch["labels"].cpu().numpy(), known.cpu().numpy())
            )
        n = len(cast(Sized, dataset))  # map-style datasets here all define __len__
        if n == 0:
            return EvalOutcome(
                0, float("nan"), float("nan"), np.array([]), time.perf_counter() - start
            )
        labels, scores = np.concatenate(all_labels), np.concatenate(all_scores)
        per_label = auroc_per_label(labels, scores)
        return EvalOutcome(
            num_examples=n,
            loss=loss_sum / pairs if pairs else float("nan"),
            auroc_macro=macro_auroc(per_label),
            auroc_per_label=per_label,
            seconds=time.perf_counter() - start,
        )
