"""Label-free pretraining of the fusion family's encoders: cross-modal alignment.

A patient's image, EHR row and note are three views of the same findings. A
contrastive (InfoNCE, CLIP-style) loss per pair of modalities pulls the embeddings
of one patient's views together and pushes other patients' apart, so the encoders
learn what the modalities share, the findings, without ever reading a label.
Cross-modal alignment alone keeps only what the other modalities also show (a
nodule is seen on the image, hardly in the EHR or note), so the image encoder
also learns from two augmented views of each image (SimCLR): invariance to the
intensity scale, offset and noise that differ between scanners, and to small
shifts and flips.
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
        self.image_views = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 3, H] pooled modality embeddings -> [B, 3, width], unit length."""
        projected = torch.stack(
            [head(pooled[:, i]) for i, head in enumerate(self.heads)], dim=1
        )
        return nn.functional.normalize(projected, dim=-1)


def augment_images(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each image [B, C, H, W] in [0, 1].

    A scanner's intensity scale, offset and noise, a shift of up to 1/8 of the
    side, a horizontal flip.
    """
    batch, _, height, width = image.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand(batch, 1, 1, 1, generator=generator)
        return (low + (high - low) * draw).to(image)

    view = image * uniform(0.75, 1.25) + uniform(-0.1, 0.1)
    view = view + uniform(0.0, 0.04) * torch.randn(image.shape, generator=generator).to(
        image
    )
    shifts = torch.randint(
        -height // 8, height // 8 + 1, (batch, 2), generator=generator
    )
    flips = torch.rand(batch, generator=generator) < 0.5
    moved = []
    for i in range(batch):
        one = torch.roll(
            view[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2)
        )
        moved.append(one.flip(-1) if flips[i] else one)
    return torch.stack(moved).clamp(0.0, 1.0)


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
