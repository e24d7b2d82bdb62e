"""DP-SGD on the n-gram table keeps each example's gradient as the rows it touched.

The clipping must be exactly what dense per-example gradients give: the same
per-example norms over all trainable tensors, the same clip factors, the same
clipped sum, in every grad-sample mode, with duplicate ids, padding, a table used
twice in one pass, and several batches accumulated before a step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.client.dp import (
    GHOST_CLIP_MARGIN,
    DpTraining,
    check_rows_per_example,
    clipped_backward,
    private_training,
)
from wardround.client.dp_rows import RowGrads, RowSparseDPOptimizer
from wardround.common.config import GradSampleMode
from wardround.common.errors import ConfigError
from wardround.models.wide import NgramTable, WideTerm
from wardround.sitedata.dataset import TensorDictDataset

pytestmark = [
    # Opacus's hooks on a module whose inputs need no gradient: expected
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:In CPU autocast"),
]

BUCKETS, EHR, LABELS, BATCH = 97, 5, 4, 6
MAX_NORM = 0.7


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BUCKETS, (BATCH, 12), generator=gen)
    ids[:, 9:] = 0  # padding
    ids[1, 4] = ids[1, 3]  # a duplicate id within one note
    ids[2] = 0  # a note without n-grams
    present = torch.ones(BATCH, 3)
    present[3, 2] = 0  # a study without a note
    ehr = torch.randn(BATCH, EHR, generator=gen)
    labels = (torch.rand(BATCH, LABELS, generator=gen) > 0.5).float()
    return ehr, ids, present, labels


def _model() -> WideTerm:
    model = WideTerm(BUCKETS, EHR, LABELS)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _loss(model: torch.nn.Module, ehr, ids, present, labels) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(
        model(ehr, ids, present), labels
    )


def _reference(
    model: WideTerm, inputs, max_norm: float = MAX_NORM
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example loop: each tensor's clipped sum, and the per-example norms."""
    params = list(model.parameters())
    per_example = [
        torch.autograd.grad(_loss(model, *(x[i : i + 1] for x in inputs)), params)
        for i in range(BATCH)
    ]
    norms = torch.stack(
        [torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example]
    )
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = [
        sum(factor[i] * per_example[i][j] for i in range(BATCH))
        for j in range(len(params))
    ]
    return clipped, norms


def _private(
    model: torch.nn.Module,
    mode: GradSampleMode,
    *,
    noise_multiplier: float = 0.0,
    lr: float = 0.1,
):
    studies = TensorDictDataset(
        {"study": torch.arange(BATCH), "labels": torch.zeros(BATCH, LABELS)},
        np.arange(BATCH),
    )
    loader = torch.utils.data.DataLoader(studies, batch_size=BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dp = DpTraining(noise_multiplier, MAX_NORM, mode, secure_mode=False)
    return private_training(model, optimizer, loader, dp, seed=0)


@pytest.mark.parametrize(
    "mode", [GradSampleMode.HOOKS, GradSampleMode.EW, GradSampleMode.FUNCTORCH]
)
def test_the_clipped_sum_equals_a_per_example_loop(mode: GradSampleMode) -> None:
    inputs = _inputs(1)
    expected, _ = _reference(_model(), inputs)
    model = _model()
    with _private(model, mode) as parts:
        assert isinstance(parts.optimizer, RowSparseDPOptimizer)
        parts.optimizer.zero_grad(set_to_none=True)
        _loss(parts.model, *inputs).backward()
        table = model.note.weight
        if mode is GradSampleMode.HOOKS:  # the rows, never a dense copy per example
            assert isinstance(table.grad_sample, RowGrads)
            assert table.grad_sample.value.shape[0] <= BATCH * 12
        parts.optimizer.clip_and_accumulate()
        for got, want in zip(model.parameters(), expected, strict=True):
            # Opacus averages the loss over the batch: its sum is BATCH × the mean's
            torch.testing.assert_close(got.summed_grad, want, rtol=1e-5, atol=1e-6)


def test_ghost_clipping_gives_the_per_example_loops_clipped_sum() -> None:
    """Ghost clipping measures the table's per-example norms without its gradients
    (the norm sampler registered for NgramTable); the clipped sum is the loop's."""
    inputs = _inputs(4)
    # ghost clips a margin below the clip; the noise stays scaled to the clip
    expected, norms = _reference(_model(), inputs, MAX_NORM * (1 - GHOST_CLIP_MARGIN))
    model = _model()
    with _private(model, GradSampleMode.GHOST) as parts:
        assert parts.ghost
        assert parts.optimizer.max_grad_norm == MAX_NORM
        parts.optimizer.zero_grad(set_to_none=True)
        ehr, ids, present, labels = inputs
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            parts.model(ehr, ids, present), labels, reduction="none"
        ).mean(dim=1)
        clipped_backward(parts.model, parts.optimizer, losses)
        torch.testing.assert_close(
            parts.model.get_norm_sample(), norms, rtol=1e-5, atol=1e-6
        )
        assert getattr(model.note.weight, "grad_sample", None) is None
        for got, want in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-6)


def test_rows_hold_the_same_gradients_as_opacus_dense_sampler() -> None:
    inputs = _inputs(2)
    dense = {}
    for mode in (GradSampleMode.HOOKS, GradSampleMode.EW):
        model = _model()
        with _private(model, mode) as parts:
            parts.optimizer.zero_grad(set_to_none=True)
            _loss(parts.model, *inputs).backward()
            sample = model.note.weight.grad_sample
            dense[mode] = sample.dense() if isinstance(sample, RowGrads) else sample
    torch.testing.assert_close(
        dense[GradSampleMode.HOOKS], dense[GradSampleMode.EW], rtol=1e-5, atol=1e-7
    )


def test_a_step_without_zero_grad_is_refused() -> None:
    inputs = _inputs(3)
    model = _model()
    with _private(model, GradSampleMode.HOOKS) as parts:
        parts.optimizer.zero_grad(set_to_none=True)
        _loss(parts.model, *inputs).backward()
        assert parts.optimizer.pre_step()
        with pytest.raises(ValueError, match="zero_grad"):
            parts.optimizer.pre_step()


def test_the_noise_reaches_every_row_of_the_table() -> None:
    """Rows no note touched still get noise: the release is the whole table."""
    inputs = _inputs(4)
    model = _model()
    with _private(model, GradSampleMode.HOOKS, noise_multiplier=1.0) as parts:
        parts.optimizer.zero_grad(set_to_none=True)
        _loss(parts.model, *inputs).backward()
        assert parts.optimizer.pre_step()
        grad = model.note.weight.grad
    untouched = torch.ones(BUCKETS, dtype=torch.bool)
    untouched[inputs[1].unique()] = False
    assert untouched.sum() > 0
    assert (grad[untouched] != 0).all()
    # std of the averaged noise: σ · C / expected batch size
    std = float(grad[untouched].std())
    assert 0.5 * MAX_NORM / BATCH < std < 2 * MAX_NORM / BATCH


def test_two_accumulated_batches_clip_per_example() -> None:
    """Rows of two passes stack as Opacus stacks dense per-example gradients."""
    first, second = _inputs(5), _inputs(6)
    both = tuple(torch.cat([a, b]) for a, b in zip(first, second, strict=True))
    params_model = _model()
    params = list(params_model.parameters())
    per_example = [
        torch.autograd.grad(_loss(params_model, *(x[i : i + 1] for x in both)), params)
        for i in range(2 * BATCH)
    ]
    norms = torch.stack(
        [torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per_example]
    )
    factor = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
    table_index = [n for n, _ in params_model.named_parameters()].index("note.weight")
    # each pass's loss is its own batch mean: Opacus scales each by its batch size
    expected = sum(factor[i] * per_example[i][table_index] for i in range(2 * BATCH))

    model = _model()
    with _private(model, GradSampleMode.HOOKS) as parts:
        parts.model.allow_grad_accumulation()
        parts.optimizer.zero_grad(set_to_none=True)
        _loss(parts.model, *first).backward()
        _loss(parts.model, *second).backward()
        assert parts.optimizer.accumulated_iterations == 2
        parts.optimizer.clip_and_accumulate()
        torch.testing.assert_close(
            model.note.weight.summed_grad, expected, rtol=1e-5, atol=1e-6
        )


class _TwiceLookedUp(torch.nn.Module):
    """One table read twice in a pass: the rows of both reads sum per example."""

    def __init__(self) -> None:
        super().__init__()
        self.table = NgramTable(BUCKETS, LABELS)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.table(a).sum(1) + 2 * self.table(b).sum(1)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 9), min_size=3, max_size=3), min_size=2, max_size=5
    ),
    st.integers(0, 2**16),
)
def test_rows_equal_dense_for_any_ids(ids: list[list[int]], seed: int) -> None:
    """Property: rows, densified, equal the dense per-example gradients."""
    a = torch.tensor(ids)
    b = a.flip(1)
    gen = torch.Generator().manual_seed(seed)
    module = _TwiceLookedUp()
    module.table = NgramTable(10, LABELS)
    with torch.no_grad():
        module.table.weight.copy_(torch.randn(10, LABELS, generator=gen))
    target = torch.randn(len(ids), LABELS, generator=gen)
    per_example = torch.stack(
        [
            torch.autograd.grad(
                (module(a[i : i + 1], b[i : i + 1]) - target[i]).pow(2).sum(),
                module.table.weight,
            )[0]
            for i in range(len(ids))
        ]
    )
    grads_out = 2 * (module(a, b) - target)  # d loss / d output, per example
    rows_a = RowGrads.of_lookup(a, grads_out.unsqueeze(1).expand(-1, 3, -1), 10)
    rows_b = RowGrads.of_lookup(b, 2 * grads_out.unsqueeze(1).expand(-1, 3, -1), 10)
    rows = rows_a.plus(rows_b)
    torch.testing.assert_close(rows.dense(), per_example, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rows.norms(), per_example.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("secure", [False, True])
def test_the_noise_is_opacus_own_draw(secure: bool) -> None:
    """In place or not, the noised gradient is bit for bit Opacus's."""
    from opacus.optimizers import DPOptimizer

    inputs = _inputs(7)
    grads = {}
    for cls in (DPOptimizer, RowSparseDPOptimizer):
        model = _model()
        with _private(model, GradSampleMode.EW) as parts:  # dense: both can read it
            optimizer = cls(
                torch.optim.SGD(model.parameters(), lr=0.1),
                noise_multiplier=1.3,
                max_grad_norm=MAX_NORM,
                expected_batch_size=BATCH,
                generator=torch.Generator().manual_seed(11),
                secure_mode=secure,
            )
            optimizer.zero_grad(set_to_none=True)
            _loss(parts.model, *inputs).backward()
            assert optimizer.pre_step()
            grads[cls] = [p.grad.clone() for p in model.parameters()]
    for ours, theirs in zip(
        grads[RowSparseDPOptimizer], grads[DPOptimizer], strict=True
    ):
        assert torch.equal(ours, theirs)


def test_an_empty_poisson_draw_is_a_noise_only_step() -> None:
    """No patient drawn: the step still adds the noise, to every tensor, and moves."""
    from types import SimpleNamespace

    from wardround.client.trainer import _private_step

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    spec = SimpleNamespace(proximal_mu=0.0)
    with _private(model, GradSampleMode.HOOKS, noise_multiplier=1.0, lr=1.0) as parts:
        parts.optimizer.zero_grad(set_to_none=True)
        _private_step(model, parts.optimizer, spec, {}, empty=True)
        expected = parts.optimizer.expected_batch_size
    moves = torch.cat(
        [
            (p.detach() - b).flatten()
            for p, b in zip(model.parameters(), before, strict=True)
        ]
    )
    assert (moves != 0).all()
    # pure noise: std σ · C / expected batch size, mean about 0
    std = float(moves.std())
    assert 0.8 * MAX_NORM / expected < std < 1.2 * MAX_NORM / expected
    assert abs(float(moves.mean())) < 0.1 * std


def test_lookups_of_different_batch_sizes_pad_to_the_larger() -> None:
    big = RowGrads.of_lookup(
        torch.arange(1, 9).view(4, 2), torch.ones(4, 2, LABELS), 10
    )
    small = RowGrads.of_lookup(torch.tensor([[1, 1]]), torch.ones(1, 2, LABELS), 10)
    for summed in (small.plus(big), big.plus(small)):
        assert len(summed) == 4
        assert summed.norms().shape == (4,)
        # example 0: row 1 gets 1 + 2 per label, row 2 gets 1: 4 × 3² + 4 × 1²
        assert float(summed.norms()[0]) == pytest.approx(40**0.5)


def test_half_precision_norms_do_not_overflow() -> None:
    grads = torch.full((1, 1, 1), 300.0, dtype=torch.float16)
    rows = RowGrads.of_lookup(torch.tensor([[1]]), grads, 4)
    assert float(rows.norms()[0]) == pytest.approx(300.0)


class _Tiled(torch.nn.Module):
    """Two rows per example through its layer, as image tiles in a vision tower."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(EHR, LABELS)

    def forward(self, ehr: torch.Tensor) -> torch.Tensor:
        tiles = torch.cat([ehr, 2 * ehr])  # [2B, EHR]: the tiles of every example
        return self.layer(tiles).view(2, len(ehr), LABELS).sum(0)


def _per_example_backward(parts, logits, labels) -> None:
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, reduction="none"
    ).mean(dim=1)
    if parts.ghost:
        clipped_backward(parts.model, parts.optimizer, losses)
    else:
        losses.mean().backward()


@pytest.mark.parametrize(
    ("mode", "batch"), [(GradSampleMode.HOOKS, BATCH), (GradSampleMode.GHOST, 1)]
)
def test_a_step_with_several_rows_per_example_is_refused(mode, batch) -> None:
    """Opacus would clip each tile, not each patient (ghost: one patient's tiles'
    clip factors broadcast silently; with more patients Opacus fails itself)."""
    ehr, ids, present, labels = _inputs(6)
    with _private(_Tiled(), mode) as parts:
        parts.optimizer.zero_grad(set_to_none=True)
        _per_example_backward(parts, parts.model(ehr[:batch]), labels[:batch])
        with pytest.raises(ConfigError, match="one gradient row per example"):
            check_rows_per_example(
                parts.model, parts.optimizer, batch, ghost=parts.ghost
            )
    with _private(_model(), mode) as parts:  # one row per example passes
        parts.optimizer.zero_grad(set_to_none=True)
        _per_example_backward(parts, parts.model(ehr, ids, present), labels)
        check_rows_per_example(parts.model, parts.optimizer, BATCH, ghost=parts.ghost)


def test_ghost_clipping_refuses_weights_below_float32() -> None:
    model = _model()
    model.register_parameter(
        "frozen", torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), False)
    )
    with pytest.raises(ConfigError, match="needs float32 weights"):
        with _private(model, GradSampleMode.GHOST):
            pass


def test_ghost_rounds_run_without_tf32_and_restore_the_settings() -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with _private(_model(), GradSampleMode.GHOST):
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32  # torch's default, restored
    finally:
        torch.set_float32_matmul_precision(before)
