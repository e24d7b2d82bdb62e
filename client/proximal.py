"""FedProx's proximal term (Li et al., MLSys 2020), a pure function.

Flower's FedProx only sends ``proximal-mu``; the site adds
``mu/2 · ||w - w_global||²`` over the trainable tensors to its loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def proximal_term(
    params: Iterable[tuple[str, torch.Tensor]],
    anchor: Mapping[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """Return ``mu/2 · Σ ||p - anchor[name]||²`` over ``params``; 0 when mu is 0."""
    total: torch.Tensor | None = None
    for name, param in params:
        sq = (param - anchor[name]).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None or mu == 0.0:
        return torch.zeros(())
    return 0.5 * mu * total


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the proximal anchor)."""
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def add_proximal_gradient(
    model: torch.nn.Module, anchor: Mapping[str, torch.Tensor], mu: float
) -> None:
    """Add ``mu · (p - anchor)``, the gradient of the proximal term, to ``p.grad``.

    Used after DP-SGD's noise: the term does not touch data, so it costs no privacy.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            param.grad.add_(param.detach() - anchor[name], alpha=mu)
