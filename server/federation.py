"""The coordinator's round loop over adapter deltas.

Each round: Flower's strategy samples sites and builds the train messages (global
adapter *weights* + round config); sites reply with *deltas*; the coordinator
takes their example-weighted mean and steps the global adapter; then every
sampled site evaluates the new global adapter on its own validation split.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid

from ..common.adapter import (
    adapter_sha256,
    adapter_state,
    num_bytes,
    payload_keys,
    save_peft_adapter,
)
from ..common.aggregation import apply_delta, weighted_metric_mean
from ..common.config import LoraVariant, RunConfig
from ..common.errors import FederationError, PrivacyBudgetExhausted, WardroundError
from ..common.models import build_model
from ..common.models.registry import describe
from .phases import RoundPhases
from .plots import plot_privacy, plot_rounds
from .records import RoundRecord, SiteEvalReport, SiteFailure, SiteTrainReport
from .rundir import RunDirectory, versions
from .strategy import make_strategy

log = logging.getLogger(__name__)


class RoundObserver(Protocol):
    """Receives progress (the CLI's progress display, logs)."""

    def on_start(self, total_rounds: int) -> None:
        """The run is about to start its first round."""

    def on_round(self, record: RoundRecord) -> None:
        """A round finished."""


@dataclass
class FederationResult:
    """What a finished run produced."""

    run_dir: Path
    rounds: list[RoundRecord]
    summary: dict[str, Any]


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_dir: Path,
    site_names: Callable[[int, int], str] | None = None,
    observer: RoundObserver | None = None,
    run_id: str | None = None,
) -> FederationResult:
    """Run ``config.federation.rounds`` rounds and write the run directory."""
    started = time.time()
    name_of = site_names or (
        lambda node_id, index: (
            f"site-{index + 1:02d}" if index >= 0 else f"node-{node_id}"
        )
    )
    built = build_model(config)
    global_state = adapter_state(built.model)
    model_info = describe(built)
    keys = payload_keys(
        global_state, frozen_lora_a=config.model.lora_variant is LoraVariant.FFA
    )
    run_id = run_id or uuid.uuid4().hex
    phases = RoundPhases(
        strategy=make_strategy(config.federation),
        grid=grid,
        config=config,
        fingerprint=built.base_fingerprint,
        name_of=name_of,
        run_id=run_id,
        payload_shapes={k: tuple(global_state[k].shape) for k in keys},
    )
    out = RunDirectory(run_dir, config)
    out.write_config()
    records: list[RoundRecord] = []
    bytes_per_site: dict[str, int] = {}
    if observer:
        observer.on_start(config.federation.rounds)

    # Round 0: every site evaluates the initial adapter, the baseline the rounds improve on.
    start0 = time.perf_counter()
    evals0, failures0 = phases.evaluate(0, global_state)
    records.append(
        _record(
            0,
            [],
            evals0,
            failures0,
            adapter_sha256(global_state),
            time.perf_counter() - start0,
            0.0,
        )
    )
    out.write_round(records[0], _manifest(config, built.base_fingerprint, records[0]))

    stopped: WardroundError | None = None
    for server_round in range(1, config.federation.rounds + 1):
        round_start = time.perf_counter()
        try:
            phase = phases.train(server_round, global_state)
        except (FederationError, PrivacyBudgetExhausted) as exc:
            # Keep every completed round: write the run directory, then report.
            log.error("run stopped in round %d: %s", server_round, exc.message)
            stopped = exc
            break
        for report in phase.reports:
            bytes_per_site[report.site] = (
                bytes_per_site.get(report.site, 0) + report.bytes_sent
            )
        global_state = apply_delta(global_state, phase.mean_delta)

        eval_reports, eval_failures = phases.evaluate(server_round, global_state)
        sha = adapter_sha256(global_state)
        record = _record(
            server_round,
            phase.reports,
            eval_reports,
            phase.failures + eval_failures,
            sha,
            time.perf_counter() - round_start,
            phase.aggregation_seconds,
            aggregation=phase.aggregation.value,
            secure_aggregation=phase.secure_aggregation,
        )
        out.write_round(record, _manifest(config, built.base_fingerprint, record))
        every = config.output.checkpoint_every
        if every and (
            server_round % every == 0 or server_round == config.federation.rounds
        ):
            out.write_checkpoint(server_round, global_state, sha)
        records.append(record)
        if observer:
            observer.on_round(record)
        log.info(
            "round %d: global AUROC %.3f, loss %.4f",
            server_round,
            record.global_auroc,
            record.global_loss,
        )

    save_peft_adapter(built.model, global_state, run_dir / "adapter")
    plot_rounds(records, run_dir / "plots")
    plot_privacy(records, run_dir / "plots")
    summary = _summary(
        config,
        records,
        model_info,
        bytes_per_site,
        started,
        built.base_fingerprint,
        global_state,
        payload=phases.payload_shapes,
        run_id=run_id,
        stopped=stopped,
    )
    out.write_final(summary)
    if stopped is not None:
        raise type(stopped)(
            f"{stopped.message}\nThe run directory {run_dir} holds the "
            f"{len(records) - 1} completed round(s).",
            hint=stopped.hint,
        )
    return FederationResult(run_dir=Path(run_dir), rounds=records, summary=summary)


def _record(
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
) -> RoundRecord:
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
    )


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


def _manifest(
    config: RunConfig, fingerprint: str, record: RoundRecord
) -> dict[str, Any]:
    return {
        "round": record.round,
        "participants": [
            {"node_id": t.node_id, "site": t.site, "num_examples": t.num_examples}
            for t in record.train
        ],
        "failures": [{"node_id": f.node_id, "phase": f.phase} for f in record.failures],
        "strategy": config.federation.strategy.value,
        "proximal_mu": config.federation.proximal_mu,
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


def _summary(
    config: RunConfig,
    records: list[RoundRecord],
    model_info: dict[str, Any],
    bytes_per_site: dict[str, int],
    started: float,
    fingerprint: str,
    state: dict[str, np.ndarray],
    *,
    payload: Iterable[str],
    run_id: str,
    stopped: WardroundError | None,
) -> dict[str, Any]:
    payload = list(payload)
    last = records[-1]
    trained = records[1:]
    return {
        "run_id": run_id,
        "status": "completed" if stopped is None else f"stopped: {stopped.title}",
        "stop_reason": None if stopped is None else stopped.message,
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
            "global": {"auroc_macro": last.global_auroc, "loss": last.global_loss},
            "sites": {
                e.site: {
                    "auroc_macro": e.auroc_macro,
                    "loss": e.loss,
                    "num_examples": e.num_examples,
                    "auroc_per_label": e.auroc_per_label,
                }
                for e in last.evaluate
            },
        },
        "history": {
            "global_auroc": [r.global_auroc for r in records],
            "global_loss": [r.global_loss for r in records],
        },
        "bytes_sent_per_site": bytes_per_site,
        "privacy_spent": privacy_by_site(records),
        "timings": {
            "started": started,
            "finished": time.time(),
            "wall_seconds": time.time() - started,
            "round_seconds": [r.seconds for r in records],
            "aggregation_seconds": [r.aggregation_seconds for r in records],
        },
        "versions": versions(),
    }
