"""What a run reports: each round's record and manifest, and ``run.json``'s summary.

Pure functions of the run's config, its round records and what the strategy sent;
:class:`~wardround.server.rundir.RunDirectory` writes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np

from ..common import wire
from ..common.adapter import num_bytes
from ..common.aggregation import weighted_metric_mean
from ..common.config import RunConfig
from ..common.errors import WardroundError
from .records import RoundRecord, SiteEvalReport, SiteFailure, SiteTrainReport
from .rundir import RunStart, versions


def round_record(
    server_round: int,
    train: list[SiteTrainReport],
    evals: list[SiteEvalReport],
    failures: list[SiteFailure],
    sha: str,
    seconds: float,
    aggregation_seconds: float,
    *,
    aggregation: str = "none",
    secure_aggregation: dict[str, Any] | None = None,
    phase_seconds: dict[str, float] | None = None,
    asked_again: list[dict[str, Any]] | None = None,
) -> RoundRecord:
    """A round's record: its reports, failures and example-weighted global metrics.

    ``phase_seconds``: how long the training phase (sending, the sites' training,
    aggregation) and the evaluation phase took at the coordinator.
    ``asked_again``: each time a phase of the round fell short because sites went
    away and was asked again, the phase and the failures of the ask before.
    """
    return RoundRecord(
        round=server_round,
        train=train,
        evaluate=evals,
        failures=failures,
        global_auroc=weighted_metric_mean(
            [e.auroc_macro for e in evals], [e.num_examples for e in evals]
        ),
        global_loss=weighted_metric_mean(
            [e.loss for e in evals], [e.num_examples for e in evals]
        ),
        train_loss=weighted_metric_mean(
            [t.loss for t in train], [t.num_examples for t in train]
        ),
        adapter_sha256=sha,
        seconds=seconds,
        aggregation_seconds=aggregation_seconds,
        aggregation=aggregation,
        secure_aggregation=secure_aggregation,
        extra={
            **_generative_extra(evals),
            **({"phase_seconds": phase_seconds} if phase_seconds else {}),
            **({"asked_again": asked_again} if asked_again else {}),
        },
    )


def clip_advice(record: RoundRecord, bound: float) -> str | None:
    """What to fix when every site of a plain round had to clip its delta, else None.

    A robustness bound that every honest site reaches scales every update down:
    the federation then learns slower than its sites, without failing. Under
    SecAgg+ sites keep ``delta-clipped`` home, so this says nothing there (each
    site logs its own clipping).
    """
    if bound <= 0 or not record.train:
        return None
    if not all(t.delta_clipped for t in record.train):
        return None
    norms = [t.delta_l2 for t in record.train if np.isfinite(t.delta_l2)]
    spread = f" (L2 norms {min(norms):.3g} to {max(norms):.3g})" if norms else ""
    return (
        f"round {record.round}: every site clipped its adapter delta{spread} to "
        f"federation.delta-clip-norm = {bound:g}, so each update was scaled down; "
        "set federation.delta-clip-norm above the sites' norms"
    )


def _generative_extra(evals: list[SiteEvalReport]) -> dict[str, Any]:
    """Global generative scores (vlm family), or nothing for a classifier.

    Perplexity is weighted by each site's validation examples; the generation
    scores by the examples each site generated for.
    """
    if not any(e.metrics for e in evals):
        return {}
    generated = [e.metrics.get(wire.EVAL_GENERATED, 0.0) for e in evals]
    scores: dict[str, float] = {}
    for name in wire.GENERATIVE_METRICS:
        if name == wire.EVAL_GENERATED:
            scores[name] = float(sum(generated))
            continue
        weights = [
            e.num_examples if name == wire.EVAL_PERPLEXITY else g
            for e, g in zip(evals, generated, strict=True)
        ]
        values = [e.metrics.get(name, float("nan")) for e in evals]
        scores[name] = weighted_metric_mean(values, weights)
    return {"generative": scores}


def _dp_settings(config: RunConfig) -> dict[str, Any] | None:
    if not config.privacy.enabled:
        return None
    return config.privacy.model_dump(mode="json", by_alias=True)


def privacy_by_site(records: list[RoundRecord]) -> dict[str, dict[str, Any]]:
    """Each site's latest privacy accounting and its per-round history."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        for report in record.train:
            if report.privacy is None:
                continue
            entry = out.setdefault(report.site, {"per_round": []})
            entry.update(asdict(report.privacy))
            entry["per_round"].append(
                {
                    "round": record.round,
                    "epsilon_run": report.privacy.epsilon_run,
                    "epsilon_run_prv": report.privacy.epsilon_run_prv,
                    "epsilon_total": report.privacy.epsilon_total,
                }
            )
    return out


def bytes_by_site(records: Iterable[RoundRecord]) -> dict[str, int]:
    """Bytes each site sent over these rounds (also those reloaded on resuming)."""
    sent: dict[str, int] = {}
    for record in records:
        for report in record.train:
            sent[report.site] = sent.get(report.site, 0) + report.bytes_sent
    return sent


def manifest(
    config: RunConfig,
    fingerprint: str,
    record: RoundRecord,
    strategy_settings: dict[str, Any],
) -> dict[str, Any]:
    """A round's manifest; ``strategy_settings``: what its train messages carried."""
    return {
        "round": record.round,
        "participants": [
            {"node_id": t.node_id, "site": t.site, "num_examples": t.num_examples}
            for t in record.train
        ],
        "failures": [{"node_id": f.node_id, "phase": f.phase} for f in record.failures],
        "strategy": strategy_settings["strategy"],
        "proximal_mu": strategy_settings["proximal_mu"],
        "lora_variant": config.model.lora_variant.value,
        "delta_clip_norm": config.federation.delta_clip_norm,
        "aggregation": record.aggregation,
        "differential_privacy": _dp_settings(config),
        "privacy_spent": {
            t.site: asdict(t.privacy) for t in record.train if t.privacy is not None
        },
        "secure_aggregation": record.secure_aggregation,
        "base_model_fingerprint": fingerprint,
        "adapter_sha256": record.adapter_sha256,
        "versions": versions(),
    }


def summary(
    config: RunConfig,
    records: list[RoundRecord],
    model_info: dict[str, Any],
    start: RunStart,
    fingerprint: str,
    state: dict[str, np.ndarray],
    *,
    payload: Iterable[str],
    stopped: WardroundError | None,
) -> dict[str, Any]:
    """``run.json``: the config, final and per-round metrics, privacy, bytes, timings."""
    payload = list(payload)
    last = records[-1]
    trained = records[1:]
    resumed = start.resumed_from
    return {
        "run_id": start.run_id,
        "status": "completed" if stopped is None else f"stopped: {stopped.title}",
        "stop_reason": None if stopped is None else stopped.message,
        "resumed_from_round": (
            None if not resumed else resumed[0] if len(resumed) == 1 else resumed
        ),
        "config": config.model_dump(mode="json", by_alias=True),
        "model": {
            **model_info,
            "adapter_tensors": len(state),
            "adapter_payload_tensors": len(payload),
            "adapter_payload_bytes": num_bytes({k: state[k] for k in payload}),
            "base_model_fingerprint": fingerprint,
        },
        "aggregation": sorted({r.aggregation for r in trained}) or ["none"],
        "differential_privacy": _dp_settings(config),
        "rounds_completed": len(records) - 1,
        "final": {
            "global": {
                "auroc_macro": last.global_auroc,
                "loss": last.global_loss,
                **last.extra.get("generative", {}),
            },
            "sites": {
                e.site: {
                    "auroc_macro": e.auroc_macro,
                    "loss": e.loss,
                    "num_examples": e.num_examples,
                    "auroc_per_label": e.auroc_per_label,
                    **e.metrics,
                }
                for e in last.evaluate
            },
        },
        "history": {
            "global_auroc": [r.global_auroc for r in records],
            "global_loss": [r.global_loss for r in records],
            **(
                {"global_generative": [r.extra.get("generative") for r in records]}
                if "generative" in last.extra
                else {}
            ),
        },
        "bytes_sent_per_site": bytes_by_site(records),
        "privacy_spent": privacy_by_site(records),
        "timings": {
            # since the run first started, downtime before a resumption included
            "started": start.started,
            "finished": time.time(),
            "wall_seconds": time.time() - start.started,
            "round_seconds": [r.seconds for r in records],
            "aggregation_seconds": [r.aggregation_seconds for r in records],
        },
        "versions": versions(),
    }
