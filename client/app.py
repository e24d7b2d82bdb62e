"""The site's Flower ``ClientApp``: train and evaluate the global adapter locally.

What leaves the site: the adapter *delta* (float32, the declared trainable
tensors only) and numeric metrics keyed by fixed names (see ``common/wire.py``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..common import wire
from ..common.adapter import (
    adapter_state,
    from_record,
    l2_norm,
    load_adapter_state,
    to_record,
)
from ..common.aggregation import subtract
from ..common.config import RunConfig
from ..common.errors import ModelMismatchError
from .runtime import SiteRuntime, get_runtime, resolve_site_toml


def _setup(
    msg: Message, context: Context, run_config: dict[str, Any] | None
) -> tuple[RunConfig, SiteRuntime, ConfigRecord, dict[str, np.ndarray]]:
    import torch

    config = RunConfig.from_flower(
        run_config if run_config is not None else dict(context.run_config)
    )
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    site_toml, site_index = resolve_site_toml(dict(context.node_config), config)
    runtime = get_runtime(site_toml, site_index, config)
    round_config = (
        msg.content[wire.CONFIG] if wire.CONFIG in msg.content else ConfigRecord()
    )
    expected = round_config.get(wire.BASE_FINGERPRINT)
    if expected != runtime.built.base_fingerprint:
        raise ModelMismatchError(
            f"the coordinator asks to train against base model {str(expected)[:12]}…, "
            f"this site has {runtime.built.base_fingerprint[:12]}…",
            hint="Use the same model section of the run config and the same weights at every site.",
        )
    global_state = from_record(msg.content[wire.GLOBAL_ADAPTER])
    load_adapter_state(runtime.built.model, global_state)
    return config, runtime, round_config, global_state


def _round_seed(config: RunConfig, runtime: SiteRuntime, server_round: int) -> int:
    text = f"{config.federation.seed}/{runtime.site.site.name}/{server_round}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def handle_train(
    msg: Message, context: Context, run_config: dict[str, Any] | None = None
) -> Message:
    """Train the received global adapter on local data; reply with the delta."""
    from .trainer import LocalTrainSpec, train_local

    config, runtime, round_config, global_state = _setup(msg, context, run_config)
    server_round = int(round_config.get(wire.SERVER_ROUND, 0))
    spec = LocalTrainSpec(
        epochs=config.train.local_epochs,
        max_steps=config.train.max_steps,
        batch_size=config.train.batch_size,
        learning_rate=config.train.learning_rate,
        weight_decay=config.train.weight_decay,
        proximal_mu=float(round_config.get(wire.PROXIMAL_MU, 0.0)),
        seed=_round_seed(config, runtime, server_round),
        modality_dropout=config.train.modality_dropout,
    )
    outcome = train_local(runtime.built.model, runtime.data.train, spec)
    delta = subtract(adapter_state(runtime.built.model), global_state)
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: outcome.num_examples,
            wire.SITE_INDEX: runtime.site_index,
            wire.TRAIN_LOSS: outcome.mean_loss,
            wire.TRAIN_STEPS: outcome.steps,
            wire.TRAIN_SECONDS: outcome.seconds,
            wire.DELTA_L2: l2_norm(delta),
        }
    )
    content = RecordDict({wire.ADAPTER_DELTA: to_record(delta), wire.METRICS: metrics})
    return Message(content, reply_to=msg)


def handle_evaluate(
    msg: Message, context: Context, run_config: dict[str, Any] | None = None
) -> Message:
    """Evaluate the received global adapter on the local validation split."""
    from .trainer import evaluate

    config, runtime, _, _ = _setup(msg, context, run_config)
    outcome = evaluate(
        runtime.built.model, runtime.data.validation, config.train.eval_batch_size
    )
    values: dict[str, float | int] = {
        wire.NUM_EXAMPLES: outcome.num_examples,
        wire.SITE_INDEX: runtime.site_index,
        wire.EVAL_LOSS: outcome.loss,
        wire.AUROC_MACRO: outcome.auroc_macro,
        wire.EVAL_SECONDS: outcome.seconds,
    }
    for label, value in zip(config.task.labels, outcome.auroc_per_label, strict=False):
        values[wire.AUROC_PREFIX + label] = float(value)
    return Message(RecordDict({wire.METRICS: MetricRecord(values)}), reply_to=msg)


def build_client_app(run_config: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` overrides the context's (in-process simulation)."""
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_config)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, run_config)

    return client_app


app = build_client_app()
