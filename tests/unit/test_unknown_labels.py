"""A label cell the site does not know (empty, or a code it did not map) is unknown:
left out of the loss and of AUROC, never trained or scored as a negative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from wardround.client.metrics import auroc_per_label, labels_or_unknown
from wardround.client.objectives import FusionObjective, example_bce
from wardround.simulations.study.classical import _Fitted
from wardround.sitedata.dataset import TensorDictDataset


def test_auroc_leaves_out_unknown_labels_per_column():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (40, 2)).astype(float)
    scores = rng.random((40, 2))
    known = np.ones_like(labels)
    known[:10, 0] = 0  # unknown in the first column only
    got = auroc_per_label(labels_or_unknown(labels, known), scores)
    assert got[0] == pytest.approx(roc_auc_score(labels[10:, 0], scores[10:, 0]))
    assert got[1] == pytest.approx(roc_auc_score(labels[:, 1], scores[:, 1]))


def test_a_column_whose_known_labels_have_one_class_has_no_auroc():
    labels = np.array([[1.0], [0.0], [1.0]])
    got = auroc_per_label(labels_or_unknown(labels, np.array([[1], [0], [1]])), labels)
    assert np.isnan(got[0])


def test_example_loss_counts_known_labels_only():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.3, 0.3]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    known = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    got = example_bce(logits, {"labels": labels, "label_known": known})
    pair = nn.functional.binary_cross_entropy_with_logits(
        logits, labels, reduction="none"
    )
    # per label of the task: a known pair weighs what it weighs in a full row
    assert got[0] == pytest.approx(float((pair[0, 0] + pair[0, 2]) / 3))
    assert got[1] == 0.0  # nothing known: nothing to learn from
    # without a mask every label is known: the plain per-example mean
    plain = example_bce(logits, {"labels": labels})
    torch.testing.assert_close(plain, pair.mean(dim=1))


class _Logits(nn.Module):
    """A model whose logits are its parameters, one row per example."""

    def __init__(self, n: int, labels: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n, labels))

    def forward(
        self, image: torch.Tensor, ehr: torch.Tensor, *rest: torch.Tensor
    ) -> torch.Tensor:
        return self.logits[ehr[:, 0].long()]


def _batch(n: int, known: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image": torch.zeros(n, 1, 2, 2),
        "ehr": torch.arange(n, dtype=torch.float32)[:, None],
        "note_ids": torch.zeros(n, 1, dtype=torch.long),
        "note_mask": torch.zeros(n, 1, dtype=torch.long),
        "present": torch.ones(n, 3),
        "note_ngrams": torch.zeros(n, 1, dtype=torch.long),
        "labels": torch.zeros(n, known.shape[1]),
        "label_known": known,
    }


def test_an_unknown_label_gets_no_gradient_and_no_push_towards_negative():
    known = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    model = _Logits(2, 2)
    objective = FusionObjective(modality_dropout=0.0, frozen_features=False)
    objective.loss(model, _batch(2, known), torch.Generator()).backward()
    grad = model.logits.grad
    assert grad is not None and grad[0, 1] == 0.0
    assert (grad[known.bool()] > 0).all()  # the known negatives are pushed down


def test_evaluation_scores_only_known_labels():
    n = 8
    labels = torch.tensor([[1.0], [0.0]] * (n // 2))
    known = torch.ones(n, 1)
    known[-2:] = 0  # two unknown cells, with scores that would break the ranking
    model = _Logits(n, 1)
    with torch.no_grad():
        model.logits[:, 0] = labels[:, 0] * 2 - 1
        model.logits[-2:, 0] = torch.tensor([-5.0, 5.0])  # "positive" scored lowest
    batch = _batch(n, known)
    batch["labels"] = labels
    dataset = TensorDictDataset(batch)
    objective = FusionObjective(modality_dropout=0.0, frozen_features=False)
    outcome = objective.evaluate(model, dataset, batch_size=3)
    assert outcome.auroc_macro == 1.0  # the unknown pair did not count as a miss
    bce = nn.functional.binary_cross_entropy_with_logits(
        model.logits[:-2].detach(), labels[:-2]
    )
    assert outcome.loss == pytest.approx(float(bce), rel=1e-6)


def test_the_classical_reference_fits_each_finding_on_its_known_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(float)
    labels = np.stack([y, y], axis=1)
    labels[:20, 1] = np.nan  # the second finding unknown for a third of the rows
    fitted = _Fitted(x, labels, seed=0)
    scores = fitted.scores(x)
    assert np.isfinite(scores).all()
    assert roc_auc_score(y, scores[:, 1]) > 0.9


def test_scores_equal_within_float_rounding_rank_nothing():
    from wardround.client.metrics import auroc_per_label

    labels = np.array([[1.0], [0.0], [1.0], [0.0], [np.nan]])
    # one float32 output for every example, but for rounding in a batched pass
    tied = np.float32(0.4871) + np.array([[0.0], [3e-8], [0.0], [-3e-8], [0.0]])
    assert auroc_per_label(labels, tied)[0] == 0.5
    # real separation, however small in absolute terms, is still ranked
    apart = np.array([[0.52], [0.48], [0.51], [0.49], [0.9]])
    assert auroc_per_label(labels, apart)[0] == 1.0
