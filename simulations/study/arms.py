"""Run one arm of the study on one federation and seed; return its numbers.

Federated arms run wardround's own round loop against the sites' real ClientApps
(local training, FedProx term, DP-SGD, SecAgg+ mod, egress guard) in this process
(:func:`~wardround.simulations.in_process.run_in_process`): every message goes
through Flower's protobuf encoding, and no Ray cluster starts per arm.

Pooled and local-only arms run the same local trainer and evaluation
(:mod:`wardround.client.trainer`) on the same site datasets the ClientApps load
(same per-patient train/validation split), from the same initial adapter, for the
same ``rounds × local-epochs`` passes over each training example, with the
ClientApp's per-round shuffling seeds. Like a round, each "round" of a pooled or
local arm starts a fresh optimizer; then every site's validation split is scored.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...common.config import RunConfig
from .stats import demographics, subgroup_auroc


@dataclass(frozen=True)
class ArmOutcome:
    """What one arm produced on one federation and seed (all numbers)."""

    per_round: list[dict[str, float]]
    """Round r (0: untrained) -> site -> macro AUROC on the site's validation split.
    For local-only: each site's own model."""
    per_label: dict[str, dict[str, float]]
    """After the last round: site -> label -> AUROC."""
    train_examples: dict[str, int]
    validation_examples: dict[str, int]
    seconds: float
    cpu_seconds: float
    """This process's CPU time for the arm: less sensitive than ``seconds`` to
    other work on a shared machine."""
    upload_bytes_per_round: dict[str, float] | None = None
    """Federated: site -> mean bytes it uploaded per round (Flower's wire encoding)."""
    epsilon: dict[str, float] | None = None
    """DP: site -> epsilon (RDP) this run spent there by the end."""
    round_seconds: list[float] | None = None
    aggregation_seconds: list[float] | None = None
    model: dict[str, Any] | None = None
    """Adapter and base-model sizes (federated arms)."""
    subgroups: dict[str, dict[str, dict[str, float]]] | None = None
    """'overall' / 'sex' / 'age' / 'site' -> group -> {auroc, n}: the final model."""

    @property
    def final(self) -> dict[str, float]:
        """Site -> macro AUROC after the last round."""
        return self.per_round[-1]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArmOutcome:
        """Inverse of :meth:`to_json` (NaN written as null comes back as NaN)."""

        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        return cls(
            per_round=[{k: num(v) for k, v in r.items()} for r in data["per_round"]],
            per_label={
                s: {k: num(v) for k, v in labels.items()}
                for s, labels in data["per_label"].items()
            },
            train_examples=dict(data["train_examples"]),
            validation_examples=dict(data["validation_examples"]),
            seconds=float(data["seconds"]),
            cpu_seconds=float(data["cpu_seconds"]),
            upload_bytes_per_round=data.get("upload_bytes_per_round"),
            epsilon=data.get("epsilon"),
            round_seconds=data.get("round_seconds"),
            aggregation_seconds=data.get("aggregation_seconds"),
            model=data.get("model"),
            subgroups=data.get("subgroups"),
        )


@dataclass(frozen=True)
class _Site:
    name: str
    data: Any  # sitedata.dataset.SiteData
    privacy: Any = None  # common.config.SitePrivacy: the site's floor


def _sites(config: RunConfig, site_tomls: list[Path]) -> list[_Site]:
    """The sites' datasets as their ClientApps load them (shared runtime cache)."""
    from ...client.runtime import get_runtime

    runtimes = [get_runtime(toml, i, config) for i, toml in enumerate(site_tomls)]
    return [
        _Site(toml.parent.name, r.data, r.site.privacy)
        for toml, r in zip(site_tomls, runtimes, strict=True)
    ]


def _use_threads(config: RunConfig) -> None:
    """Torch's threads as the run config says (the ClientApp does the same).

    Torch's default, a thread per core, oversubscribes the cores when several
    study workers (or other work) share them.
    """
    import torch

    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)


def _fresh_model(config: RunConfig) -> Any:
    from ...client.runtime import resolve_device
    from ...models import build_model

    return build_model(config).model.to(resolve_device(config.train.device))


def round_seed(config: RunConfig, site_name: str, server_round: int) -> int:
    """The ClientApp's shuffling seed for a site's round (``client.app``'s formula)."""
    text = f"{config.federation.seed}/{site_name}/{server_round}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _spec(config: RunConfig, name: str, server_round: int, patients: int) -> Any:
    from ...client.trainer import LocalTrainSpec

    return LocalTrainSpec.from_config(
        config,
        seed=round_seed(config, name, server_round),
        proximal_mu=0.0,
        patients=patients,
    )


def _scores(model: Any, site: _Site, config: RunConfig) -> Any:
    from ...client.trainer import evaluate

    return evaluate(model, site.data.validation, config.train.eval_batch_size)


def _per_label(outcome: Any, config: RunConfig) -> dict[str, float]:
    return {
        label: float(value)
        for label, value in zip(
            config.task.labels, outcome.auroc_per_label, strict=False
        )
    }


def predict(model: Any, dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fusion model's sigmoid scores and the labels, [n, labels], in dataset order.

    A label the site does not know is NaN (left out of AUROC).

    Per-example predictions stay in the study (synthetic patients); a site's
    ClientApp only ever reports aggregate metrics.
    """
    import torch
    from torch.utils.data import DataLoader

    from ...client.metrics import labels_or_unknown
    from ...client.trainer import INPUT_KEYS

    model.eval()
    device = next(model.parameters()).device
    scores, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            inputs = {k: batch[k].to(device) for k in INPUT_KEYS if k in batch}
            scores.append(torch.sigmoid(model(**inputs)).float().cpu().numpy())
            known = batch.get("label_known")
            labels.append(
                labels_or_unknown(
                    batch["labels"].numpy(), None if known is None else known.numpy()
                )
            )
    return np.concatenate(scores), np.concatenate(labels)


def final_subgroups(
    model: Any, sites: list[_Site], config: RunConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """AUROC of ``model`` over every site's validation split, by sex, age band, site."""
    scores, labels, sexes, ages, names = [], [], [], [], []
    for site in sites:
        dataset = site.data.validation
        if len(dataset) == 0:
            continue
        s, y = predict(model, dataset, config.train.eval_batch_size)
        ehr = np.stack([dataset[i]["ehr"].numpy() for i in range(len(dataset))])
        sex, age = demographics(ehr, config.task)
        scores.append(s)
        labels.append(y)
        sexes += sex
        ages += age
        names += [site.name] * len(dataset)
    all_scores, all_labels = np.concatenate(scores), np.concatenate(labels)
    return {
        "overall": subgroup_auroc(all_labels, all_scores, ["all"] * len(names)),
        "sex": subgroup_auroc(all_labels, all_scores, sexes),
        "age": subgroup_auroc(all_labels, all_scores, ages),
        "site": subgroup_auroc(all_labels, all_scores, names),
    }


def run_pooled(
    config: RunConfig, site_tomls: list[Path], *, subgroups: bool
) -> ArmOutcome:
    """Centralised training on the union of the sites' training splits."""
    from torch.utils.data import ConcatDataset

    from ...client.trainer import train_local

    _use_threads(config)
    start, cpu_start = time.perf_counter(), time.process_time()
    sites = _sites(config, site_tomls)
    model = _fresh_model(config)
    union: ConcatDataset[Any] = ConcatDataset([s.data.train for s in sites])
    evaluations = [{s.name: _scores(model, s, config) for s in sites}]
    for server_round in range(1, config.federation.rounds + 1):
        patients = sum(s.data.num_privacy_units for s in sites)
        train_local(model, union, _spec(config, "pooled", server_round, patients))
        evaluations.append({s.name: _scores(model, s, config) for s in sites})
    return ArmOutcome(
        per_round=[{n: e.auroc_macro for n, e in r.items()} for r in evaluations],
        per_label={n: _per_label(e, config) for n, e in evaluations[-1].items()},
        train_examples={s.name: len(s.data.train) for s in sites},
        validation_examples={s.name: len(s.data.validation) for s in sites},
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        subgroups=final_subgroups(model, sites, config) if subgroups else None,
    )


def run_local(config: RunConfig, site_tomls: list[Path]) -> ArmOutcome:
    """Each site trains alone on its own training split and is scored on its own."""
    from ...client.trainer import train_local
    from ...common.adapter import adapter_state, load_adapter_state

    _use_threads(config)
    start, cpu_start = time.perf_counter(), time.process_time()
    sites = _sites(config, site_tomls)
    model = _fresh_model(config)
    initial = adapter_state(model)
    rounds = config.federation.rounds
    per_round: list[dict[str, float]] = [{} for _ in range(rounds + 1)]
    per_label = {}
    for site in sites:
        load_adapter_state(model, initial)  # every site starts from the same adapter
        per_round[0][site.name] = _scores(model, site, config).auroc_macro
        for server_round in range(1, rounds + 1):
            spec = _spec(config, site.name, server_round, site.data.num_privacy_units)
            train_local(model, site.data.train, spec)
            outcome = _scores(model, site, config)
            per_round[server_round][site.name] = outcome.auroc_macro
        per_label[site.name] = _per_label(outcome, config)
    return ArmOutcome(
        per_round=per_round,
        per_label=per_label,
        train_examples={s.name: len(s.data.train) for s in sites},
        validation_examples={s.name: len(s.data.validation) for s in sites},
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


def run_federated(
    config: RunConfig, site_tomls: list[Path], run_dir: Path, *, subgroups: bool
) -> ArmOutcome:
    """A whole run of wardround's federation on an in-process grid.

    Raises what :func:`~wardround.simulations.in_process.run_in_process` raises
    when a round cannot complete (the run directory keeps the completed rounds).
    """
    from safetensors.numpy import load_file

    from ...common.adapter import load_adapter_state
    from ..in_process import run_in_process

    _use_threads(config)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run_in_process(config, run_dir, n_sites=len(site_tomls))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    trained = result.rounds[1:]
    uploads: dict[str, list[int]] = {}
    epsilon: dict[str, float] = {}
    for record in trained:
        for report in record.train:
            uploads.setdefault(report.site, []).append(report.bytes_sent)
            if report.privacy is not None:
                epsilon[report.site] = report.privacy.epsilon_run
    last = result.rounds[-1]
    outcome_subgroups = None
    if subgroups:
        model = _fresh_model(config)
        checkpoint = (
            run_dir / "checkpoints" / f"round-{last.round:03d}" / "adapter.safetensors"
        )
        load_adapter_state(model, load_file(str(checkpoint)))
        outcome_subgroups = final_subgroups(model, _sites(config, site_tomls), config)
    model_info = result.summary["model"]
    # Counts from the sites' own data on this machine: on the wire they are as
    # coarse as each site's answer policy makes them.
    local = _sites(config, site_tomls)
    return ArmOutcome(
        per_round=[{e.site: e.auroc_macro for e in r.evaluate} for r in result.rounds],
        per_label={e.site: dict(e.auroc_per_label) for e in last.evaluate},
        train_examples={site.name: len(site.data.train) for site in local},
        validation_examples={site.name: len(site.data.validation) for site in local},
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        upload_bytes_per_round={s: float(np.mean(b)) for s, b in uploads.items()},
        epsilon=epsilon or None,
        round_seconds=[r.seconds for r in trained],
        aggregation_seconds=[r.aggregation_seconds for r in trained],
        model={
            "adapter_payload_bytes": model_info["adapter_payload_bytes"],
            "adapter_bytes_float32": model_info["adapter_bytes_float32"],
            "base_model_bytes_float32": model_info["base_model_bytes_float32"],
        },
        subgroups=outcome_subgroups,
    )
