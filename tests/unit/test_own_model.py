"""A site's own model mixed into its evaluation (federation.own-model-weight): the
mixture's arithmetic, its loss, and the runs it is refused for."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.client.metrics import auroc_per_label, mean_log_loss
from wardround.client.own_model import mixed_outcome, mixture_log_probabilities
from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError

LABELS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, np.nan], [0.0, 0.0]])
GLOBAL = np.array([[2.2, -1.4], [0.4, -0.4], [-0.4, 0.0], [-2.2, -0.8]])
OWN = np.array([[-0.8, -2.2], [-2.2, 2.2], [1.4, 0.8], [-1.4, -1.4]])


def _logit(p):
    p = np.asarray(p, float)
    return np.log(p / (1 - p))


def _bce_from_logits(labels, logits):
    known = ~np.isnan(labels)
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(logits[known]), torch.tensor(labels[known])
        )
    )


def test_weight_zero_is_the_global_model_and_one_the_sites_own():
    alone = mixed_outcome(GLOBAL, OWN, LABELS, 0.0, 0.0)
    own = mixed_outcome(GLOBAL, OWN, LABELS, 1.0, 0.0)

    assert np.allclose(alone.auroc_per_label, auroc_per_label(LABELS, GLOBAL))
    assert np.allclose(own.auroc_per_label, auroc_per_label(LABELS, OWN))
    assert alone.loss == pytest.approx(_bce_from_logits(LABELS, GLOBAL))
    assert own.loss == pytest.approx(_bce_from_logits(LABELS, OWN))


def test_the_mixture_ranks_by_the_weighted_mean_of_the_two_probabilities():
    # Each model misorders one pair of the first finding; their mean orders both.
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    first = _logit([[0.9], [0.6], [0.5], [0.1]])
    second = _logit([[0.5], [0.1], [0.9], [0.6]])

    assert auroc_per_label(labels, first)[0] == 0.75
    assert auroc_per_label(labels, second)[0] == 0.75
    mixed = mixed_outcome(first, second, labels, 0.5, 1.5)
    assert mixed.auroc_macro == 1.0
    assert mixed.num_examples == 4 and mixed.seconds == 1.5
    # 0.25 · second + 0.75 · first: 0.8, 0.475, 0.6, 0.225
    assert mixed_outcome(first, second, labels, 0.25, 0.0).auroc_macro == 1.0
    log_p, log_q = mixture_log_probabilities(first, second, 0.25)
    assert np.allclose(np.exp(log_p).ravel(), [0.8, 0.475, 0.6, 0.225])
    assert np.allclose(np.exp(log_p) + np.exp(log_q), 1.0)


def test_a_confident_miss_costs_what_its_logits_say():
    labels = np.array([[0.0]])
    confident = np.array([[30.0]])

    outcome = mixed_outcome(confident, confident, labels, 0.5, 0.0)
    assert outcome.loss == pytest.approx(30.0, rel=1e-6)
    assert math.isnan(
        mean_log_loss(np.array([[np.nan]]), np.zeros((1, 1)), np.zeros((1, 1)))
    )


@settings(max_examples=60, deadline=None)
@given(
    weight=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_the_mixtures_loss_is_at_most_the_weighted_mean_of_the_two(weight, seed):
    # BCE is convex in the probability: mixing never costs more than the mean loss.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (12, 3)).astype(float)
    first, second = rng.normal(0.0, 4.0, (2, 12, 3))

    mixed = mixed_outcome(first, second, labels, weight, 0.0).loss
    bound = weight * _bce_from_logits(labels, second) + (1 - weight) * (
        _bce_from_logits(labels, first)
    )
    assert mixed <= bound + 1e-9


def _runtime(tmp_path, shapes):
    from types import SimpleNamespace

    return SimpleNamespace(
        site=SimpleNamespace(cache_path=tmp_path, site=SimpleNamespace(name="site-01")),
        adapter_shapes=shapes,
    )


def test_a_diverged_own_model_is_neither_kept_nor_used(tmp_path):
    from safetensors.numpy import save_file

    from wardround.client.personal import load_own_model, own_model_path, save_own_model

    runtime = _runtime(tmp_path, {"head.weight": (2, 3)})
    good = {"head.weight": np.ones((2, 3), np.float32)}
    bad = {"head.weight": np.full((2, 3), np.nan, np.float32)}

    assert save_own_model(runtime, "run", good)
    assert not save_own_model(runtime, "run", bad)
    kept = load_own_model(runtime, "run")
    assert kept is not None and np.array_equal(kept["head.weight"], good["head.weight"])
    # a file written otherwise (an older release, a disk fault) is refused as well
    save_file(bad, str(own_model_path(runtime, "run")))
    assert load_own_model(runtime, "run") is None
    save_file({"other": np.ones(2, np.float32)}, str(own_model_path(runtime, "run")))
    assert load_own_model(runtime, "run") is None
    assert load_own_model(runtime, "another run") is None


def test_a_dp_run_refuses_a_model_trained_outside_dp_sgd():
    with pytest.raises(ConfigError, match="own-model-weight trains a model"):
        RunConfig.from_mapping(
            {"privacy": {"enabled": True}, "federation": {"own-model-weight": 0.5}}
        )
    assert RunConfig.from_mapping(
        {"privacy": {"enabled": True}, "federation": {"personal": ["head"]}}
    ).federation.personal == ("head",)


def test_a_text_generating_family_refuses_a_probability_mixture():
    with pytest.raises(ConfigError, match="mixes two classifiers' probabilities"):
        RunConfig.from_mapping(
            {
                "model": {"family": "vlm", "tiny-arch": "llava"},
                "task": {"kind": "report"},
                "federation": {"own-model-weight": 0.5},
            }
        )


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_the_share_is_a_fraction(weight):
    with pytest.raises(ConfigError, match="own-model-weight"):
        RunConfig.from_mapping({"federation": {"own-model-weight": weight}})


def test_diverged_personal_modules_are_neither_kept_nor_used(tmp_path):
    from types import SimpleNamespace

    from safetensors.numpy import save_file

    from wardround.client.personal import _path, load_personal, save_personal

    runtime = _runtime(tmp_path, {"head.weight": (2, 3), "fusion.weight": (3,)})
    runtime.config = SimpleNamespace(federation=SimpleNamespace(personal=("head",)))
    good = {"head.weight": np.ones((2, 3), np.float32), "fusion.weight": np.ones(3)}
    bad = {**good, "head.weight": np.full((2, 3), np.inf, np.float32)}

    save_personal(runtime, "run", good)
    save_personal(runtime, "run", bad)
    kept = load_personal(runtime, "run")
    assert list(kept) == ["head.weight"] and np.isfinite(kept["head.weight"]).all()
    save_file({"head.weight": bad["head.weight"]}, str(_path(runtime, "run")))
    assert load_personal(runtime, "run") == {}
