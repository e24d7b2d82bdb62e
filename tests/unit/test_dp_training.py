"""DP-SGD training through Opacus: the adapter changes, still predicts, and the
site's cached model carries no Opacus hooks afterwards.

Guards against DP + LoRA updates being silently lost or corrupted (an open
upstream report: loss and epsilon look normal while the adapter is wrong).
"""

import numpy as np
import pytest

from wardround.client.dp import GHOST_CLIP_MARGIN, DpTraining
from wardround.client.runtime import get_runtime
from wardround.client.trainer import LocalTrainSpec, evaluate, train_local
from wardround.common.adapter import adapter_sha256, adapter_state, load_adapter_state
from wardround.common.config import GradSampleMode, RunConfig


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("dp-site")
    synthesize_federation(root, 1, patients_per_site=300, seed=0)
    return get_runtime(next(root.glob("*/site.toml")), 0, RunConfig())


def _spec(seed):
    return LocalTrainSpec(
        epochs=2, max_steps=0, batch_size=16, learning_rate=5e-3, weight_decay=0.0,
        proximal_mu=0.0, seed=seed, modality_dropout=0.1,
    )  # fmt: skip


def test_a_dp_trained_adapter_changed_and_still_beats_chance(site):
    model = site.built.model
    initial = adapter_state(model)
    dp = DpTraining(0.2, 1.0, GradSampleMode.HOOKS, secure_mode=False)
    try:
        before = evaluate(model, site.data.validation, 64).auroc_macro
        for seed in range(3):
            outcome = train_local(model, site.data.train, _spec(seed), dp)
        after = evaluate(model, site.data.validation, 64).auroc_macro
        trained = adapter_state(model)
    finally:
        load_adapter_state(model, initial)
    assert outcome.steps == 30
    assert adapter_sha256(trained) != adapter_sha256(initial)
    changed = [k for k in initial if not np.array_equal(initial[k], trained[k])]
    assert any(".lora_" in k for k in changed) and any("head" in k for k in changed)
    assert after > 0.55 and after > before


@pytest.mark.parametrize("mode", [GradSampleMode.HOOKS, GradSampleMode.GHOST])
def test_opacus_leaves_no_hooks_on_the_cached_model(site, mode):
    model = site.built.model
    initial = adapter_state(model)
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    try:
        train_local(
            model,
            site.data.train,
            _spec(0),
            DpTraining(1.0, 1.0, mode, False),
        )
    finally:
        load_adapter_state(model, initial)
    assert (
        sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
        == hooks
    )
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None
        assert getattr(p, "_norm_sample", None) is None


@pytest.mark.parametrize("proximal_mu", [0.0, 0.05])
def test_ghost_clipping_trains_the_adapter_hooks_trains(site, proximal_mu):
    """The same round (patients drawn, dropout, noise) in both modes: ghost
    clipping clips each example's gradient by its norm as hooks does, without
    keeping the gradients, so the trained adapters agree to float rounding."""
    model = site.built.model
    initial = adapter_state(model)
    spec = LocalTrainSpec(
        epochs=1, max_steps=0, batch_size=16, learning_rate=5e-2, weight_decay=0.0,
        proximal_mu=proximal_mu, seed=5, modality_dropout=0.2,
    )  # fmt: skip
    # a clip well below the gradients' norms: every example is clipped. Ghost clips
    # at clip × (1 - margin) with noise of std sigma × clip; hooks is given that clip
    # and the sigma that keeps the noise's std, so both take the same steps.
    sigma, clip = 0.5, 0.05
    inner = clip * (1 - GHOST_CLIP_MARGIN)
    modes = {
        GradSampleMode.HOOKS: DpTraining(sigma * clip / inner, inner, GradSampleMode.HOOKS, False),
        GradSampleMode.GHOST: DpTraining(sigma, clip, GradSampleMode.GHOST, False),
    }  # fmt: skip
    trained = {}
    try:
        for mode, dp in modes.items():
            outcome = train_local(model, site.data.train, spec, dp)
            trained[mode] = adapter_state(model)
            load_adapter_state(model, initial)
    finally:
        load_adapter_state(model, initial)
    assert outcome.steps > 10
    hooks, ghost = trained[GradSampleMode.HOOKS], trained[GradSampleMode.GHOST]
    assert adapter_sha256(ghost) != adapter_sha256(initial)
    for name in hooks:
        np.testing.assert_allclose(ghost[name], hooks[name], rtol=1e-4, atol=2e-5)


def test_secure_mode_noise_is_not_reproducible_and_seeded_noise_is(site):
    model = site.built.model
    initial = adapter_state(model)
    spec = LocalTrainSpec(
        epochs=1, max_steps=2, batch_size=16, learning_rate=5e-3, weight_decay=0.0,
        proximal_mu=0.0, seed=3, modality_dropout=0.0,
    )  # fmt: skip
    shas = {}
    try:
        for name, secure in (("a", False), ("b", False), ("c", True), ("d", True)):
            load_adapter_state(model, initial)
            train_local(
                model,
                site.data.train,
                spec,
                DpTraining(1.0, 1.0, GradSampleMode.HOOKS, secure),
            )
            shas[name] = adapter_sha256(adapter_state(model))
    finally:
        load_adapter_state(model, initial)
    assert shas["a"] == shas["b"]  # simulation: seeded, reproducible
    assert shas["c"] != shas["d"]  # deployment: OS-seeded generators


class _NoiseCountingOptimizer:
    """What the training loop uses of Opacus's DPOptimizer on empty draws."""

    def __init__(self, params) -> None:
        self.params = list(params)
        self.noise_steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear."""

    def pre_step(self) -> bool:
        self.noise_steps += 1
        return False  # no parameter update is needed to count the step


@pytest.mark.parametrize("max_steps", [1, 2, 3])
def test_empty_poisson_draws_count_against_max_steps(max_steps):
    """The budget was checked for max-steps steps: an empty draw must not add one."""
    import torch

    from wardround.client.trainer import _run_epochs

    model = torch.nn.Linear(2, 2)
    optimizer = _NoiseCountingOptimizer(model.parameters())
    empty_draws = [{"labels": torch.zeros(0, 2)}] * 6
    spec = LocalTrainSpec(
        epochs=1, max_steps=max_steps, batch_size=4, learning_rate=1e-3,
        weight_decay=0.0, proximal_mu=0.0, seed=0,
    )  # fmt: skip

    steps, _, seen = _run_epochs(
        model, model, optimizer, empty_draws, spec, {}, torch.Generator(), None
    )

    assert steps == optimizer.noise_steps == max_steps
    assert seen == 0
