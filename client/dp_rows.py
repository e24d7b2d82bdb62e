"""Per-example gradients of the hashed n-gram table, kept as the rows a note touched.

Opacus's grad sampler for ``nn.Embedding`` builds each example's gradient of the
whole table: batch × 65,536 × 4 floats for the wide term's table, of which one note
touches at most 256 rows. Most of a DP step went into writing, measuring and summing
those zeros. Registered for :class:`~wardround.models.wide.NgramTable`, the sampler
below keeps (example, row, gradient) triples instead, and
:class:`RowSparseDPOptimizer`, Opacus's ``DPOptimizer`` taught to read them, folds
them into the per-example norms and the clipped sum. The arithmetic is the same as
with dense per-example gradients: the same norms, clip factors and clipped sum, up
to float rounding. Noise, averaging, skipped steps and accounting are Opacus's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)

from ..models.wide import NgramTable


@dataclass
class RowGrads:
    """Per-example gradients of a [rows, dim] table, as the rows each example touched.

    Entry ``u`` is example ``example[u]``'s gradient of row ``row[u]``; each
    (example, row) pair appears once. Examples without an entry have a zero gradient.
    """

    batch_size: int
    rows: int
    example: torch.Tensor  # [U] int64
    row: torch.Tensor  # [U] int64
    value: torch.Tensor  # [U, dim]
    processed: bool = False

    @classmethod
    def coalesced(
        cls,
        batch_size: int,
        rows: int,
        example: torch.Tensor,
        row: torch.Tensor,
        value: torch.Tensor,
    ) -> RowGrads:
        """Sum the entries that share an (example, row) pair."""
        key = example * rows + row
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = value.new_zeros(unique.shape[0], value.shape[-1])
        summed.index_add_(0, inverse, value)
        return cls(batch_size, rows, unique // rows, unique % rows, summed)

    @classmethod
    def of_lookup(cls, ids: torch.Tensor, grads: torch.Tensor, rows: int) -> RowGrads:
        """From a lookup's ids [B, ...] and its output's gradient [B, ..., dim]."""
        batch_size = ids.shape[0]
        per_example = ids[0].numel() if batch_size else 0
        example = torch.arange(batch_size, device=ids.device).repeat_interleave(
            per_example
        )
        return cls.coalesced(
            batch_size,
            rows,
            example,
            ids.reshape(-1),
            grads.reshape(-1, grads.shape[-1]),
        )

    def __len__(self) -> int:
        return self.batch_size

    def plus(self, other: RowGrads) -> RowGrads:
        """The same examples' gradients summed (a table used twice in one pass).

        Lookups of different batch sizes pad to the larger, as Opacus does.
        """
        return RowGrads.coalesced(
            max(self.batch_size, other.batch_size),
            self.rows,
            torch.cat([self.example, other.example]),
            torch.cat([self.row, other.row]),
            torch.cat([self.value, other.value]),
        )

    @staticmethod
    def stacked(parts: list[RowGrads]) -> RowGrads:
        """Batches one after the other, as Opacus concatenates accumulated batches."""
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += part.batch_size
        return RowGrads(
            total,
            parts[0].rows,
            torch.cat([p.example + o for p, o in zip(parts, offsets, strict=True)]),
            torch.cat([p.row for p in parts]),
            torch.cat([p.value for p in parts]),
        )

    def norms(self) -> torch.Tensor:
        """Each example's L2 norm [B] of its gradient of the whole table."""
        # squares in at least float32: a float16 square overflows at 256
        value = self.value.to(torch.promote_types(self.value.dtype, torch.float32))
        squares = value.new_zeros(self.batch_size)
        squares.index_add_(0, self.example, value.pow(2).sum(-1))
        return squares.sqrt()

    def weighted_sum(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Σ_i weights[i] · gradient_i, as a dense tensor shaped and typed like ``like``."""
        scaled = (self.value * weights[self.example].unsqueeze(-1)).to(like.dtype)
        return torch.zeros_like(like).index_add_(0, self.row, scaled)

    def dense(self) -> torch.Tensor:
        """[B, rows, dim]: what Opacus's own sampler would have built (for checks)."""
        out = self.value.new_zeros(self.batch_size, self.rows, self.value.shape[-1])
        out[self.example, self.row] = self.value
        return out


@register_grad_sampler(NgramTable)
def _ngram_table_rows(
    layer: NgramTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus's hook for the table: leaves its gradient as touched rows.

    The rows go where Opacus's own accumulation would leave a per-example tensor
    (``_current_grad_sample``, promoted to ``grad_sample`` at the end of the pass),
    so its bookkeeping of passes and batches holds; nothing is returned for it to
    accumulate densely.
    """
    weight = layer.weight
    if weight.requires_grad:
        rows = RowGrads.of_lookup(activations[0], backprops, layer.num_embeddings)
        pending = getattr(weight, "_current_grad_sample", None)
        weight._current_grad_sample = rows if pending is None else pending.plus(rows)  # type: ignore[attr-defined]
    return {}


# Ghost clipping measures norms only: Opacus's embedding norm sampler is exact here.
register_norm_sampler(NgramTable)(compute_embedding_norm_sample)


# Opacus's words for a gradient used in two steps (no zero_grad between them).
_NOT_CLEARED = (
    "Gradients haven't been cleared since the last optimizer step. "
    "In order to obtain privacy guarantees you must call optimizer.zero_grad()"
    "on each step"
)


class RowSparseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer, which also reads per-example gradients kept as rows.

    Two departures from Opacus, both stricter: autograd's (non-private) batch
    gradient is dropped once the clipped sum is taken, and ``p.grad`` is a view of
    ``p.summed_grad`` with the noise added in place, so after a step
    ``summed_grad`` holds the noised gradient, never the clipped sum alone.
    """

    def _get_flat_grad_sample(self, p: torch.Tensor) -> Any:
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, RowGrads):
            return grad_sample
        if (
            isinstance(grad_sample, list)
            and grad_sample
            and all(isinstance(part, RowGrads) for part in grad_sample)
        ):
            return RowGrads.stacked(grad_sample)
        return super()._get_flat_grad_sample(p)

    @property
    def accumulated_iterations(self) -> int:
        """Opacus's count of batches since the last step, for rows as for tensors."""
        counts = set()
        for p in self.params:
            grad_sample = getattr(p, "grad_sample", None)
            if isinstance(grad_sample, list):
                counts.add(len(grad_sample))
            elif grad_sample is not None:
                counts.add(1)
            else:
                raise ValueError(
                    "Per sample gradient not found. Are you using GradSampleModule?"
                )
        if len(counts) > 1:
            raise ValueError(
                "Number of accumulated steps is inconsistent across parameters"
            )
        return counts.pop()

    def clip_and_accumulate(self) -> None:
        """Opacus's per-example clipping, with the tables' norms and sums from rows."""
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        if len(samples[0]) == 0:
            factor = torch.zeros((0,), device=self.params[0].device)
        else:
            norms = [
                s.norms()
                if isinstance(s, RowGrads)
                else s.reshape(len(s), -1).norm(2, dim=-1)
                for s in samples
            ]
            device = norms[0].device
            per_example = torch.stack([n.to(device) for n in norms], dim=1).norm(
                2, dim=1
            )
            factor = (self.max_grad_norm / (per_example + 1e-6)).clamp(max=1.0)
        for p, sample in zip(self.params, samples, strict=True):
            if isinstance(sample, RowGrads):
                parts = (
                    p.grad_sample
                    if isinstance(p.grad_sample, list)
                    else [p.grad_sample]
                )
                if any(part.processed for part in parts):
                    raise ValueError(_NOT_CLEARED)
                grad = sample.weighted_sum(factor.to(sample.value.device, p.dtype), p)
                for part in parts:
                    part.processed = True
            else:
                _check_processed_flag(p.grad_sample)
                grad = torch.einsum(
                    "i,i...", factor.to(sample.device, p.dtype), sample.to(p.dtype)
                )
                _mark_as_processed(p.grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            # autograd's batch gradient is never read under DP: free it before the
            # noise, which would otherwise hold a third table-sized tensor
            p.grad = None

    def add_noise(self) -> None:
        """Opacus's noise, added in place to the clipped sum.

        The same draws as Opacus's ``add_noise``; two table-sized tensors fewer at
        the step's peak: the sum is not copied, and outside secure mode the zeros
        ``_generate_noise`` allocates before drawing are not needed.
        """
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            if self.secure_mode:
                noise = _generate_noise(std, summed, self.generator, secure_mode=True)
                summed.add_(noise)
            elif std != 0:
                # _generate_noise's own call outside secure mode
                summed.add_(
                    torch.normal(
                        mean=0,
                        std=std,
                        size=summed.shape,
                        device=summed.device,
                        generator=self.generator,
                        dtype=summed.dtype,
                    )
                )
            p.grad = summed.view_as(p)
            _mark_as_processed(p.summed_grad)
