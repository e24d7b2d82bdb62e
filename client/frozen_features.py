"""The fusion model's frozen part, computed once per run instead of at every step.

Under the DP recipe (``model.trainable = "fusion"``) the encoders, their
projections and the EHR encoder are frozen: each study's pooled embeddings are the
same at every step, epoch and round. Training then reads them from a dataset of
embeddings, and a step runs the fusion module, the head and the wide term only.
The result is the same model (per-example gradients, clipping, noise and the
Poisson draws are unchanged); the encoders run once per study per run instead of
once per draw. A part that does not train runs as in evaluation, cached or not
(the trainer holds it in eval mode): dropout in it is off, and no batch statistic
mixes the examples of a batch.

The embeddings are kept per dataset (held weakly: they go with the site's data)
and recomputed when any frozen tensor of the model changed, or for another model.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..models.fusion import FusionModel
from ..sitedata.dataset import TensorDictDataset

FROZEN_PARTS = (
    "vision_encoder",
    "text_encoder",
    "vision_proj",
    "text_proj",
    "ehr_encoder",
)
"""The fusion model's modules before the fusion module: what a cache replaces."""
FEATURE_BATCH = 64
"""Studies per forward pass of the frozen part."""
_ENCODE_INPUTS = ("image", "ehr", "note_ids", "note_mask")
TOKEN_INPUTS = ("image", "note_ids", "note_mask")
"""Inputs the embeddings replace: a cached item carries them empty ([0] each)."""

_Key = tuple[tuple[int, int], ...]
_CACHE: weakref.WeakKeyDictionary[
    Dataset, tuple[weakref.ref[FusionModel], _Key, TensorDictDataset]
] = weakref.WeakKeyDictionary()


def cacheable_fusion(model: nn.Module) -> FusionModel | None:
    """The fusion model inside ``model`` when its frozen part can be cached.

    That is: nothing before the fusion module trains (no LoRA there, no trainable
    projection), and the fusion module reads pooled embeddings, not tokens
    (``concat`` and ``gated``; ``cross-attention`` attends over every token).
    """
    fusion = _fusion_of(model)
    if fusion is None or getattr(fusion.fusion, "reads_tokens", True):
        return None
    if any(p.requires_grad for p in _frozen_parameters(fusion)):
        return None
    return fusion


def frozen_parts(model: nn.Module) -> list[nn.Module]:
    """The fusion model's parts before its fusion module that have nothing to train."""
    fusion = _fusion_of(model)
    if fusion is None:
        return []
    return [
        part
        for name in FROZEN_PARTS
        if (part := getattr(fusion, name)) is not None
        and not any(p.requires_grad for p in part.parameters())
    ]


def hold_frozen_parts_in_eval(model: nn.Module) -> None:
    """Run the parts that do not train as in evaluation (after ``model.train()``).

    A frozen encoder is then one fixed function of its input, which the cache
    relies on, and none of its layers (dropout, batch statistics) depends on the
    rest of the batch or on chance.
    """
    for part in frozen_parts(model):
        part.eval()


def with_frozen_features(
    model: nn.Module, dataset: Dataset, *, batch_size: int = FEATURE_BATCH
) -> Dataset:
    """``dataset`` with each study's pooled embeddings in ``features``.

    Returns ``dataset`` itself when the model's frozen part cannot be cached
    (:func:`cacheable_fusion`) or the dataset is not wardround's in-memory one.
    """
    fusion = cacheable_fusion(model)
    if fusion is None or not isinstance(dataset, TensorDictDataset):
        return dataset
    key = _state_key(fusion)
    kept = _CACHE.get(dataset)
    # The model itself (a weak reference: a rebuilt model may reuse an address),
    # then the values of its frozen tensors.
    if kept is not None and kept[0]() is fusion and kept[1] == key:
        return kept[2]
    cached = _embed(fusion, dataset, batch_size)
    _CACHE[dataset] = (weakref.ref(fusion), key, cached)
    return cached


def cached_nbytes(dataset: Dataset) -> int:
    """Bytes the embeddings kept for ``dataset`` hold (0 when none are kept)."""
    kept = _CACHE.get(dataset)
    return 0 if kept is None else int(kept[2].tensors["features"].nbytes)


def _fusion_of(model: nn.Module) -> FusionModel | None:
    """The fusion model inside ``model`` (a PEFT wrapper, Opacus's), if any."""
    return next((m for m in model.modules() if isinstance(m, FusionModel)), None)


def _frozen_parameters(fusion: FusionModel) -> list[nn.Parameter]:
    return [
        param
        for name in FROZEN_PARTS
        if (part := getattr(fusion, name)) is not None
        for param in part.parameters()
    ]


def _state_key(fusion: FusionModel) -> _Key:
    """Which frozen tensors, and which values of them (in-place writes count)."""
    return tuple((id(p), p._version) for p in _frozen_parameters(fusion))


@torch.no_grad()
def _embed(
    fusion: FusionModel, dataset: TensorDictDataset, batch_size: int
) -> TensorDictDataset:
    tensors = dataset.tensors
    size = len(dataset)
    device = next(fusion.parameters()).device
    parts = [getattr(fusion, name) for name in FROZEN_PARTS]
    modes = [part.training for part in parts if part is not None]
    for part in parts:
        if part is not None:
            part.eval()
    try:
        chunks = []
        for start in range(0, size, batch_size):
            rows = slice(start, start + batch_size)
            image, ehr, note_ids, note_mask = (
                tensors[k][rows].to(device) for k in _ENCODE_INPUTS
            )
            # Pooled embeddings do not depend on presence (the fusion module
            # masks absent modalities), so every modality is computed.
            present = torch.ones(len(ehr), 3, device=device)
            _, pooled, _ = fusion.encode(image, ehr, note_ids, note_mask, present)
            chunks.append(pooled.cpu())
    finally:
        trained = iter(modes)
        for part in parts:
            if part is not None:
                part.train(next(trained))
    hidden = fusion.head.in_features
    features = torch.cat(chunks) if chunks else torch.zeros(0, 3, hidden)
    cached: dict[str, Any] = {k: v for k, v in tensors.items() if k not in TOKEN_INPUTS}
    for k in TOKEN_INPUTS:
        cached[k] = tensors[k].new_zeros(size, 0)
    cached["features"] = features
    return TensorDictDataset(cached, dataset.patients)
