"""Fusion modules over per-modality embeddings.

All are built from ``nn.Linear``/``nn.LayerNorm`` only, so Opacus can compute exact
per-sample gradients (a trainable ``nn.MultiheadAttention`` would break that).
Absent modalities are masked, never imputed with zeros that the model could read.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.config import Fusion


def masked_summary(per_modality: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Concatenate [B, M, H] embeddings with absent ones zeroed, then the mask [B, M]."""
    return torch.cat(
        [(per_modality * present.unsqueeze(-1)).flatten(1), present], dim=1
    )


class ConcatFusion(nn.Module):
    """Concatenate the modality embeddings (absent ones zeroed) and project."""

    reads_tokens = False
    """Fuses the pooled embeddings only (the trainer may then cache them)."""

    def __init__(self, hidden: int, n_modalities: int) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(hidden * n_modalities + n_modalities, hidden), nn.GELU()
        )

    def forward(
        self,
        tokens: list[tuple[torch.Tensor, torch.Tensor]] | None,
        pooled: torch.Tensor,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse ``pooled`` [B, M, H] given ``present`` [B, M]; ``tokens`` unread."""
        fused: torch.Tensor = self.project(masked_summary(pooled, present))
        return fused


class GatedFusion(nn.Module):
    """Sigmoid-gated average of the present modalities (Arevalo et al., 2017)."""

    reads_tokens = False

    def __init__(self, hidden: int, n_modalities: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden * n_modalities + n_modalities, n_modalities)
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())

    def forward(
        self,
        tokens: list[tuple[torch.Tensor, torch.Tensor]] | None,
        pooled: torch.Tensor,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse ``pooled`` [B, M, H] given ``present`` [B, M]; ``tokens`` unread."""
        gates = torch.sigmoid(self.gate(masked_summary(pooled, present)))
        weights = gates * present
        fused = (weights.unsqueeze(-1) * pooled).sum(1) / weights.sum(
            1, keepdim=True
        ).clamp_min(1e-6)
        out: torch.Tensor = self.out(fused)
        return out


class CrossAttentionFusion(nn.Module):
    """A query made from all modalities attends over each modality's tokens.

    One softmax per modality (a single softmax over 64 image patches, 128 note
    tokens and one EHR token would drown the EHR token); the attended vectors of
    the present modalities are then concatenated and projected. Single-head
    attention from ``nn.Linear`` layers, so per-sample gradients are exact under
    Opacus.
    """

    reads_tokens = True

    def __init__(self, hidden: int, n_modalities: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden * n_modalities + n_modalities, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(
            nn.Linear(hidden * n_modalities + n_modalities, hidden), nn.GELU()
        )
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(
        self,
        tokens: list[tuple[torch.Tensor, torch.Tensor]],
        pooled: torch.Tensor,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse per-modality token sequences ``(tokens [B, T, H], mask [B, T])``."""
        q = self.query(masked_summary(pooled, present))
        attended = []
        for seq, mask in tokens:
            scores = (q.unsqueeze(1) * self.key(seq)).sum(-1) * self.scale
            scores = scores.masked_fill(mask <= 0, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1) * (mask.sum(-1, keepdim=True) > 0)
            attended.append((weights.unsqueeze(-1) * self.value(seq)).sum(1))
        stacked = torch.stack(attended, dim=1)
        out: torch.Tensor = self.out(masked_summary(stacked, present))
        return out


# Keyed by str: Fusion is a StrEnum, so a plain string finds the same entry.
FUSIONS: dict[str, type[nn.Module]] = {
    Fusion.CONCAT: ConcatFusion,
    Fusion.GATED: GatedFusion,
    Fusion.CROSS_ATTENTION: CrossAttentionFusion,
}
