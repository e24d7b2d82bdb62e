"""The classical reference arms: logistic regression on hashed note n-grams + EHR.

What a statistician would fit in an afternoon, and the bar every neural arm has to
clear. The features are the fusion model's wide term's (:mod:`~wardround.common.
models.wide`): each note's binary bag of hashed word n-grams, L2-normalised (hashing:
no vocabulary is learned from any site's text), and the site's encoded EHR vector
(scaled values, missingness indicators, one-hot categories).

- **Pooled** and **local only**: scikit-learn's ``LogisticRegressionCV``, one model per
  finding, its L2 strength chosen by 3-fold cross-validated AUROC on the training
  split alone.
- **Federated**: FedAvg of the same linear model. Each site runs the ClientApp's
  local trainer (:func:`~wardround.client.trainer.train_local`, the run's recipe,
  DP-SGD through Opacus when the arm asks for it, with sigma planned as a site plans
  it) from the global weights; the new global weights are the example-weighted mean
  (:func:`~wardround.common.aggregation.weighted_mean`). It runs in-process: the
  model is the baseline, not a product path, so its rounds skip Flower's wire and
  the sites' delta bound (``federation.delta-clip-norm``).

Every arm is scored on each site's own validation split, like the neural arms.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...common.config import FusionModelConfig, RunConfig
from ...models.wide import WideTerm, bag_matrix
from .arms import ArmOutcome, _Site, _sites, _spec, _use_threads
from .catalog import ArmKind

CS = (0.1, 0.3, 1.0, 3.0, 10.0)
"""Inverse L2 strengths ``LogisticRegressionCV`` chooses among."""
CV_FOLDS = 3


class LinearReference(nn.Module):
    """The wide term alone: the fusion model's inputs in, logits out."""

    def __init__(self, buckets: int, ehr_width: int, n_labels: int) -> None:
        super().__init__()
        self.wide = WideTerm(buckets, ehr_width, n_labels)

    def forward(
        self,
        image: torch.Tensor,
        ehr: torch.Tensor,
        note_ids: torch.Tensor,
        note_mask: torch.Tensor,
        present: torch.Tensor,
        note_ngrams: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, labels]; only the EHR, the note's n-grams and presence are read.

        The parameters are the fusion model's inputs, in its order.
        """
        return self.wide(ehr, note_ngrams, present)


def _arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inputs, and the labels with NaN where the site's cell was unknown."""
    from ...client.metrics import labels_or_unknown

    tensors = dataset.tensors
    known = tensors.get("label_known")
    return (
        tensors["note_ngrams"].numpy(),
        tensors["ehr"].numpy(),
        tensors["present"].numpy(),
        labels_or_unknown(
            tensors["labels"].numpy(), None if known is None else known.numpy()
        ),
    )


def _features(dataset: Any, config: RunConfig) -> tuple[Any, np.ndarray]:
    ngrams, ehr, present, labels = _arrays(dataset)
    return bag_matrix(
        ngrams, ehr, present, FusionModelConfig.of(config).note_ngram_buckets
    ), labels


class _Fitted:
    """One logistic regression per finding (a constant where a finding never varies).

    Each finding's model is fitted on the examples whose label is known (not NaN).
    """

    def __init__(self, features: Any, labels: np.ndarray, seed: int) -> None:
        from sklearn.linear_model import LogisticRegressionCV

        self.models: list[Any] = []
        for k in range(labels.shape[1]):
            known = ~np.isnan(labels[:, k])
            y = labels[known, k]
            positives = int(y.sum())
            if positives < CV_FOLDS or len(y) - positives < CV_FOLDS:
                self.models.append(float(y.mean()) if len(y) else 0.0)
                continue
            model = LogisticRegressionCV(
                Cs=list(CS),
                cv=CV_FOLDS,
                scoring="roc_auc",
                solver="liblinear",  # fast on sparse, wide features
                max_iter=1000,
                random_state=seed,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence notes at extreme C
                model.fit(features[known] if not known.all() else features, y)
            self.models.append(model)

    def scores(self, features: Any) -> np.ndarray:
        """[n, labels] probabilities."""
        n = features.shape[0]
        return np.stack(
            [
                np.full(n, m)
                if isinstance(m, float)
                else m.predict_proba(features)[:, 1]
                for m in self.models
            ],
            axis=1,
        )


def _auroc(scores: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> Any:
    from ...client.metrics import auroc_per_label, macro_auroc

    per_label = auroc_per_label(labels, scores)
    return macro_auroc(per_label), dict(zip(names, map(float, per_label), strict=True))


def _untrained(sites: list[_Site]) -> dict[str, float]:
    """Round 0: every score equal, AUROC 0.5 where both classes occur."""
    return {s.name: 0.5 for s in sites}


def _outcome(
    sites: list[_Site],
    per_round: list[dict[str, float]],
    per_label: dict[str, dict[str, float]],
    start: tuple[float, float],
    **extra: Any,
) -> ArmOutcome:
    return ArmOutcome(
        per_round=per_round,
        per_label=per_label,
        train_examples={s.name: len(s.data.train) for s in sites},
        validation_examples={s.name: len(s.data.validation) for s in sites},
        seconds=time.perf_counter() - start[0],
        cpu_seconds=time.process_time() - start[1],
        **extra,
    )


def run_classical(
    config: RunConfig, site_tomls: list[Path], kind: ArmKind
) -> ArmOutcome:
    """Train and score the classical reference as ``kind`` (pooled, local, FedAvg)."""
    _use_threads(config)
    start = (time.perf_counter(), time.process_time())
    sites = _sites(config, site_tomls)
    if kind is ArmKind.FEDERATED:
        return _federated(config, sites, start)
    labels = tuple(config.task.labels)
    seed = config.federation.seed
    validation = {s.name: _features(s.data.validation, config) for s in sites}
    final: dict[str, float] = {}
    per_label: dict[str, dict[str, float]] = {}
    if kind is ArmKind.POOLED:
        from scipy import sparse

        parts = [_features(s.data.train, config) for s in sites]
        fitted = _Fitted(
            sparse.vstack([p[0] for p in parts]).tocsr(),
            np.concatenate([p[1] for p in parts]),
            seed,
        )
        models = {s.name: fitted for s in sites}
    else:
        models = {
            s.name: _Fitted(*_features(s.data.train, config), seed) for s in sites
        }
    for site in sites:
        features, y = validation[site.name]
        final[site.name], per_label[site.name] = _auroc(
            models[site.name].scores(features), y, labels
        )
    return _outcome(sites, [_untrained(sites), final], per_label, start)


def _federated(
    config: RunConfig, sites: list[_Site], start: tuple[float, float]
) -> ArmOutcome:
    from ...client.trainer import evaluate, train_local
    from ...common.aggregation import weighted_mean
    from ...common.privacy import epsilon_spent

    torch.manual_seed(config.model.init_seed)
    model = LinearReference(
        FusionModelConfig.of(config).note_ngram_buckets,
        config.task.ehr_width,
        len(config.task.labels),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def state() -> dict[str, np.ndarray]:
        return {
            n: p.detach().numpy().copy()
            for n, p in model.named_parameters()
            if n in trainable
        }

    def load(values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in values:
                    p.copy_(torch.from_numpy(values[n]))

    plans = {s.name: _dp_plan(config, s) for s in sites}
    batch = config.train.eval_batch_size
    per_round = [
        {s.name: evaluate(model, s.data.validation, batch).auroc_macro for s in sites}
    ]
    history: dict[str, list[Any]] = {s.name: [] for s in sites}
    last: dict[str, Any] = {}
    for server_round in range(1, config.federation.rounds + 1):
        global_state = state()
        updates, weights = [], []
        for site in sites:
            load(global_state)
            plan = plans[site.name]
            spec = _spec(config, site.name, server_round, site.data.num_privacy_units)
            train_local(
                model,
                site.data.train,
                spec,
                dp=plan.training if plan is not None else None,
            )
            if plan is not None:
                history[site.name].append(plan.per_round)
            updates.append(state())
            weights.append(float(len(site.data.train)))
        load(weighted_mean(updates, weights))
        last = {s.name: evaluate(model, s.data.validation, batch) for s in sites}
        per_round.append({n: e.auroc_macro for n, e in last.items()})
    epsilon = {
        name: epsilon_spent(h, plans[name].delta, plans[name].accountant)
        for name, h in history.items()
        if plans[name] is not None
    }
    labels = tuple(config.task.labels)
    per_label = {
        n: {
            label: float(v) for label, v in zip(labels, e.auroc_per_label, strict=False)
        }
        for n, e in last.items()
    }
    return _outcome(sites, per_round, per_label, start, epsilon=epsilon or None)


def _dp_plan(config: RunConfig, site: _Site) -> Any:
    """The site's DP plan for the run, as its ClientApp makes it (None: no DP)."""
    from ...client.privacy_policy import plan_site_privacy

    return plan_site_privacy(
        config, site.privacy, site.data.num_privacy_units, simulation=True
    )
