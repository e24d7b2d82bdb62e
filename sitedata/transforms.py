"""Batch transforms over the item dict: pure, seeded by an explicit generator.

``drop_modalities`` is modality dropout: it teaches the fusion model to work when
a study has no image, no EHR features or no note, so it degrades gracefully at
sites where a modality is missing.
"""

from __future__ import annotations

import torch


def drop_modalities(
    batch: dict[str, torch.Tensor], p: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Hide each present modality of each example with probability ``p``.

    Only ``present`` [B, 3] (image, EHR, note) changes; the model masks absent
    modalities out. An example never loses its last present modality: when every
    present one was drawn, one of them (chosen uniformly) is kept. Examples with
    nothing present stay as they are. The input batch is not modified.

    Parameters
    ----------
    batch
        Items collated to tensors; must hold ``present``.
    p
        Probability in [0, 1) of hiding each present modality.
    generator
        Source of randomness (CPU generator), so a site's run is reproducible.

    Returns
    -------
    dict
        A shallow copy of ``batch`` with a new ``present`` tensor.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout p must be in [0, 1), got {p}")
    present = batch["present"]
    if p == 0.0 or present.numel() == 0:
        return dict(batch)
    had = present.detach().cpu() > 0.5
    drop = torch.rand(had.shape, generator=generator) < p
    keep = had & ~drop
    emptied = had.any(dim=1) & ~keep.any(dim=1)
    if emptied.any():
        scores = torch.rand(had.shape, generator=generator).masked_fill(~had, -1.0)
        rescue = torch.nn.functional.one_hot(scores.argmax(dim=1), had.shape[1]).bool()
        keep = torch.where(emptied[:, None], rescue, keep)
    out = dict(batch)
    out["present"] = keep.to(dtype=present.dtype, device=present.device)
    return out
