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
from ..sitedata.patients import OneStudyPerPatient, patients_of


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
    if dp.grad_sample_mode is GradSampleMode.GHOST:
        # Opacus also returns its criterion wrapper, which takes (logits, targets);
        # the objectives give per-example losses instead (clipped_backward).
        dp_model, dp_optimizer, _criterion, dp_loader = made
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
        yield PrivateParts(
            model=dp_model,
            optimizer=dp_optimizer,
            loader=dp_loader,
            ghost=dp.grad_sample_mode is GradSampleMode.GHOST,
        )
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        dp_model._close()  # removes Opacus's hooks and per-sample gradients


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
