"""Label-free pretraining of the fusion family's encoders: cross-modal alignment.

A patient's image, EHR row and note are three views of the same findings. A
contrastive (InfoNCE, CLIP-style) loss per pair of modalities pulls the embeddings
of one patient's views together and pushes other patients' apart, so the encoders
learn what the modalities share, the findings, without ever reading a label.
Everything here is pure torch: no I/O, no data loading.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

MODALITY_PAIRS = tuple(itertools.combinations(range(3), 2))
"""(image, EHR), (image, note), (EHR, note) as indices into the modality axis."""


class AlignmentHeads(nn.Module):
    """One projection head per modality (image, EHR, note), used only in pretraining.

    As in SimCLR and CLIP, the contrastive loss is taken after a head that is
    thrown away, so the embeddings the fusion model keeps are not squeezed into
    exactly what the loss needs.
    """

    def __init__(self, hidden: int, width: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width)
            )
            for _ in range(3)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 3, H] pooled modality embeddings -> [B, 3, width], unit length."""
        projected = torch.stack(
            [head(pooled[:, i]) for i, head in enumerate(self.heads)], dim=1
        )
        return nn.functional.normalize(projected, dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of unit vectors ``a``, ``b`` [N, D]."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (
        nn.functional.cross_entropy(logits, target)
        + nn.functional.cross_entropy(logits.T, target)
    )


def alignment_loss(
    embeddings: torch.Tensor, present: torch.Tensor, temperature: float
) -> torch.Tensor | None:
    """Mean InfoNCE over the modality pairs, each on the examples that have both.

    ``embeddings`` [B, 3, D] are unit vectors, ``present`` [B, 3] marks the
    modalities each example has. A pair seen in fewer than 2 examples has no
    negatives and is left out; None when no pair is left.
    """
    losses = []
    for i, j in MODALITY_PAIRS:
        both = (present[:, i] > 0.5) & (present[:, j] > 0.5)
        if int(both.sum()) < 2:
            continue
        losses.append(info_nce(embeddings[both, i], embeddings[both, j], temperature))
    if not losses:
        return None
    return torch.stack(losses).mean()
