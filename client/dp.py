"""DP-SGD for one round of local training, with Opacus.

Opacus wraps the model (per-sample gradients), the optimizer (per-example clipping
and Gaussian noise) and the data loader (Poisson sampling) for the round, and is
unwrapped afterwards so the site's cached model carries no hooks between rounds.
The privacy unit is the patient: Opacus Poisson-samples the training patients and
each sampled patient gives one of their studies (:mod:`.data.patients`).
Sigma is not chosen here: it was planned once for the run's whole schedule.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..common.config import GradSampleMode
from ..common.errors import ConfigError
from ..sitedata.patients import OneStudyPerPatient, patients_of

GHOST_CLIP_MARGIN = 1e-3
"""Ghost clipping clips at ``max_grad_norm × (1 - margin)``; the noise stays scaled to
``max_grad_norm``. Its clip factors come from norms measured in the first backward
pass and multiply the gradients of the second, which round differently (float32:
about 1e-6 relative): the margin keeps every example's contribution within the
clip the accountant assumes."""


@dataclass(frozen=True)
class DpTraining:
    """How the round's optimizer is privatised."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: GradSampleMode
    secure_mode: bool
    """Opacus's secure noise (sum of four Gaussians, against floating-point
    attacks) with generators seeded from the OS's CSPRNG; off: seeded, reproducible."""


@dataclass
class PrivateParts:
    """The wrapped model, optimizer and patient-sampled loader of one round."""

    model: torch.nn.Module
    optimizer: Any  # opacus.optimizers.DPOptimizer
    loader: DataLoader
    ghost: bool = False
    """Ghost clipping: the step's backward is :func:`clipped_backward` of the
    per-example losses, and no per-example gradient exists."""


def _urandom_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(
        int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    )


@contextmanager
def private_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DpTraining,
    *,
    seed: int,
) -> Iterator[PrivateParts]:
    """Privatise (model, optimizer, loader) for one round; unwrap on exit.

    ``loader`` is the plain loader over studies: its dataset must say whose each
    study is (DataError otherwise), and its batch size and collate are kept. The
    private loader samples patients at Opacus's rate ``1 / ceil(patients /
    batch size)``, as :func:`~wardround.common.privacy.local_schedule` plans.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    from . import dp_rows  # noqa: F401  (registers the n-gram table's sampler)

    device = next(model.parameters()).device
    ghost = dp.grad_sample_mode is GradSampleMode.GHOST
    if ghost:
        _check_float32(model)
    with warnings.catch_warnings():
        # Opacus warns when its torchcsprng-based secure RNG is off; secure mode is
        # handled below, and the warning would repeat every round.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    if dp.secure_mode:
        sampling = _urandom_generator(torch.device("cpu"))
        choice = _urandom_generator(torch.device("cpu"))
    else:
        sampling = torch.Generator().manual_seed(seed)
        choice = torch.Generator().manual_seed(seed + 2)
    per_patient = DataLoader(
        OneStudyPerPatient(loader.dataset, patients_of(loader.dataset), choice),
        batch_size=loader.batch_size,
        collate_fn=loader.collate_fn,
    )
    poisson = DPDataLoader.from_data_loader(per_patient, generator=sampling)
    # When the very first Poisson batch is empty, Opacus builds a stand-in from the
    # first item's fields (dict keys, for our items) and fails; an empty list is
    # recognised by is_empty_batch like any other empty batch, and the trainer takes
    # a noise-only step for it.
    poisson.collate_fn.sample_empty_shapes = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=poisson,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples
            grad_sample_mode=dp.grad_sample_mode.value,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    if ghost:
        # Opacus also returns its criterion wrapper, which takes (logits, targets);
        # the objectives give per-example losses instead (clipped_backward).
        dp_model, dp_optimizer, _criterion, dp_loader = made
        dp_model.max_grad_norm = dp.max_grad_norm * (1.0 - GHOST_CLIP_MARGIN)
    else:
        dp_model, dp_optimizer, dp_loader = made
    dp_optimizer = _reading_rows(dp_optimizer, optimizer)
    if dp.secure_mode:
        # Opacus's own secure_mode needs torchcsprng, which has no release for
        # current torch. Use its secure noise path (four Gaussians per draw, against
        # floating-point attacks) with a generator seeded from the OS's CSPRNG.
        dp_optimizer.secure_mode = True
        dp_optimizer.generator = _urandom_generator(device)
    try:
        with _full_float32_precision() if ghost else _nothing():
            yield PrivateParts(
                model=dp_model, optimizer=dp_optimizer, loader=dp_loader, ghost=ghost
            )
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        dp_model._close()  # removes Opacus's hooks and per-sample gradients


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _full_float32_precision() -> Iterator[None]:
    """No TF32 (10-bit mantissa) in matmuls and convolutions for the round.

    Ghost clipping's two backward passes must round alike (GHOST_CLIP_MARGIN);
    cuDNN allows TF32 convolutions by default on GPUs that have them.
    """
    matmul = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _check_float32(model: torch.nn.Module) -> None:
    """Ghost clipping only through float32 (or wider) weights (GHOST_CLIP_MARGIN)."""
    float32_eps = torch.finfo(torch.float32).eps
    for name, param in model.named_parameters():
        if param.is_floating_point() and torch.finfo(param.dtype).eps > float32_eps:
            raise ConfigError(
                f"privacy.grad-sample-mode 'ghost' needs float32 weights, and "
                f"{name} is {param.dtype}: its two backward passes round "
                "differently in lower precision, and an example's clipped gradient "
                "could exceed privacy.max-grad-norm; use grad-sample-mode 'hooks'"
            )


def check_rows_per_example(
    model: torch.nn.Module, optimizer: Any, examples: int, *, ghost: bool
) -> None:
    """Refuse a step whose per-example gradients are not one row per example.

    Opacus takes a layer's batch dimension for the examples. A model that folds
    several rows per example into it (image tiles flattened into a vision tower's
    batch) would clip each row, not each patient, to the clip: a patient would
    weigh up to tiles × max-grad-norm. Checked after the backward pass and before
    the step, so nothing of such a step is released.
    """
    from .dp_rows import RowGrads

    if ghost:
        norms = getattr(model, "per_sample_gradient_norms", None)
        rows = {int(norms.shape[0])} if norms is not None else set()
    else:
        rows = set()
        for param in optimizer.params:
            sample = getattr(param, "grad_sample", None)
            for part in sample if isinstance(sample, list) else [sample]:
                if isinstance(part, RowGrads):
                    rows.add(part.batch_size)
                elif part is not None:
                    rows.add(int(part.shape[0]))
    if rows != {examples}:
        raise ConfigError(
            f"DP-SGD needs one gradient row per example: this batch of {examples} "
            f"examples gave {sorted(rows)} rows. A layer sees several rows per "
            "example (image tiles in the vision tower?): train the text tower only "
            "(model.lora-towers = ['text']) or turn the processor's image "
            "splitting off"
        )


def _reading_rows(made: Any, optimizer: torch.optim.Optimizer) -> Any:
    """``make_private``'s DPOptimizer as one that also reads per-example row gradients.

    Opacus picks its optimizer class itself; the n-gram table's sampler
    (:mod:`.dp_rows`) keeps per-example gradients as rows, which only
    :class:`~.dp_rows.RowSparseDPOptimizer` reads. Every setting carries over,
    the accountant's step hook included. Ghost clipping's optimizer is kept as is.
    """
    from opacus.optimizers import DPOptimizer

    from .dp_rows import RowSparseDPOptimizer

    if type(made) is not DPOptimizer:
        return made  # ghost clipping: no per-example gradients, norms only
    wrapped = RowSparseDPOptimizer(
        optimizer,
        noise_multiplier=made.noise_multiplier,
        max_grad_norm=made.max_grad_norm,
        expected_batch_size=made.expected_batch_size,
        loss_reduction=made.loss_reduction,
        generator=made.generator,
        secure_mode=made.secure_mode,
    )
    wrapped.attach_step_hook(made.step_hook)
    return wrapped


def clipped_backward(
    model: torch.nn.Module, optimizer: Any, example_losses: torch.Tensor
) -> None:
    """Ghost clipping's backward: each example's gradient clipped, then summed.

    Opacus's two passes (``DPTensorFastGradientClipping``): the first measures
    every example's gradient norm without keeping the gradient (ghost norms for
    linear and embedding layers), the second backpropagates the losses weighted by
    their clip factors, which leaves the clipped sum in ``p.grad``. Noise and
    averaging follow in the optimizer's step, as in the other modes.
    """
    from opacus.utils.fast_gradient_clipping_utils import (
        DPTensorFastGradientClipping,
    )

    DPTensorFastGradientClipping(model, optimizer, example_losses, "mean").backward()


def is_empty_batch(batch: Any) -> bool:
    """Poisson sampling can draw no example at all: under DP, a noise-only step."""
    if isinstance(batch, dict):
        labels = batch.get("labels")
        return labels is None or labels.shape[0] == 0
    return len(batch) == 0
