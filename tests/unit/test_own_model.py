"""A site's own model mixed into its evaluation (federation.own-model-weight): the
mixture's arithmetic, its loss, and the runs it is refused for."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.client.metrics import auroc_per_label, mean_bce
from wardround.client.own_model import mixed_outcome
from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError

LABELS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, np.nan], [0.0, 0.0]])
GLOBAL = np.array([[0.9, 0.2], [0.6, 0.4], [0.4, 0.5], [0.1, 0.3]])
OWN = np.array([[0.3, 0.1], [0.1, 0.9], [0.8, 0.7], [0.2, 0.2]])


def test_weight_zero_is_the_global_model_and_one_the_sites_own():
    alone = mixed_outcome(GLOBAL, OWN, LABELS, 0.0, 0.0)
    own = mixed_outcome(GLOBAL, OWN, LABELS, 1.0, 0.0)

    assert np.allclose(alone.auroc_per_label, auroc_per_label(LABELS, GLOBAL))
    assert np.allclose(own.auroc_per_label, auroc_per_label(LABELS, OWN))
    assert alone.loss == pytest.approx(mean_bce(LABELS, GLOBAL))


def test_the_mixture_ranks_by_the_weighted_mean_of_the_two_probabilities():
    # Each model misorders one pair of the first finding; their mean orders both.
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    first = np.array([[0.9], [0.6], [0.5], [0.1]])
    second = np.array([[0.5], [0.1], [0.9], [0.6]])

    assert auroc_per_label(labels, first)[0] == 0.75
    assert auroc_per_label(labels, second)[0] == 0.75
    mixed = mixed_outcome(first, second, labels, 0.5, 1.5)
    assert mixed.auroc_macro == 1.0
    assert mixed.num_examples == 4 and mixed.seconds == 1.5
    # 0.25 · second + 0.75 · first: 0.8, 0.475, 0.6, 0.225
    assert mixed_outcome(first, second, labels, 0.25, 0.0).auroc_macro == 1.0


def test_mean_bce_counts_known_cells_only_and_bounds_a_confident_miss():
    labels = np.array([[1.0, np.nan], [0.0, 1.0]])
    scores = np.array([[0.8, 0.0], [0.2, 0.5]])

    expected = -(math.log(0.8) + math.log(0.8) + math.log(0.5)) / 3
    assert mean_bce(labels, scores) == pytest.approx(expected)
    assert math.isfinite(mean_bce(np.array([[1.0]]), np.array([[0.0]])))
    assert math.isnan(mean_bce(np.array([[np.nan]]), np.array([[0.5]])))


@settings(max_examples=60, deadline=None)
@given(
    weight=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_the_mixtures_loss_is_at_most_the_weighted_mean_of_the_two(weight, seed):
    # BCE is convex in the probability: mixing never costs more than the mean loss.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (12, 3)).astype(float)
    first, second = rng.uniform(0.01, 0.99, (2, 12, 3))

    mixed = mixed_outcome(first, second, labels, weight, 0.0).loss
    bound = weight * mean_bce(labels, second) + (1 - weight) * mean_bce(labels, first)
    assert mixed <= bound + 1e-9


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
