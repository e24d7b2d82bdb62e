"""SecAgg+ round vs plain round: time and bytes, measured in one run.

Five sites (default) reply with fixed adapter deltas of about one million float32
parameters through the site's real client mods (error sanitizing, egress guard,
Flower's SecAgg+ mod); the coordinator aggregates them once in the clear
(Message API) and once with SecAgg+ (the legacy-workflow bridge). Messages run
on an in-process grid that encodes every message with Flower's protobuf, so the
byte counts are wire bytes and the times hold no network or Ray scheduling.

    python bench/secagg_round.py [--sites 5] [--params 1048576] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from wardround.client.egress import EgressAllowlist
from wardround.client.egress_mods import site_mods
from wardround.common import wire
from wardround.common.adapter import clip_l2, from_record, to_record, wire_header
from wardround.common.aggregation import weighted_mean
from wardround.common.config import SecureAggregationConfig
from wardround.common.secagg_math import mean_error_bound, plan_quantization
from wardround.flower_compat.legacy import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
from wardround.flower_compat.legacy import recorddict_compat as compat
from wardround.flower_compat.secagg_workflow import run_secure_train
from wardround.simulations.local_grid import LocalGrid

BOUND = 4.0


def _shapes(params: int) -> OrderedDict[str, tuple[int, int]]:
    side = 256
    count = max(1, params // (side * side))
    return OrderedDict(
        (f"layer{i:02d}.lora_{'AB'[i % 2]}.weight", (side, side)) for i in range(count)
    )


def _site_app(
    delta: OrderedDict, num_examples: int, allowlist: EgressAllowlist
) -> ClientApp:
    app = ClientApp(mods=site_mods(lambda m, c: allowlist, precheck=lambda m, c: None))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        metrics = {
            wire.NUM_EXAMPLES: num_examples,
            wire.TRAIN_LOSS: 0.5,
            wire.WIRE_VERSION_KEY: wire.WIRE_VERSION,
        }
        if "fitins.parameters" in msg.content:
            content = compat.fitres_to_recorddict(
                FitRes(
                    Status(Code.OK, "Success"),
                    ndarrays_to_parameters([allowlist.layout.pack(delta)]),
                    num_examples,
                    metrics,
                ),
                keep_input=True,
            )
        else:
            content = RecordDict(
                {
                    wire.ADAPTER_DELTA: to_record(delta),
                    wire.METRICS: MetricRecord(metrics),
                }
            )
        return Message(content, reply_to=msg)

    return app


def _messages(nodes: list[int], shapes: OrderedDict) -> list[Message]:
    zeros = OrderedDict((k, np.zeros(s, np.float32)) for k, s in shapes.items())
    weights = to_record(zeros)
    return [
        Message(
            RecordDict(
                {
                    wire.GLOBAL_ADAPTER: weights,
                    wire.CONFIG: ConfigRecord(
                        {wire.SERVER_ROUND: 1, **wire_header(zeros)}
                    ),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id="1",
        )
        for node in nodes
    ]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its table; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--params", type=int, default=1_048_576)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    shapes = _shapes(args.params)
    n_params = sum(a * b for a, b in shapes.values())
    rng = np.random.default_rng(0)
    nodes = [101 + i for i in range(args.sites)]
    examples = [200 + 37 * i for i in range(args.sites)]
    deltas = [
        clip_l2(
            OrderedDict(
                (k, rng.normal(0, 0.01, s).astype(np.float32))
                for k, s in shapes.items()
            ),
            BOUND,
        )[0]
        for _ in nodes
    ]
    allowlist = EgressAllowlist.for_payload(dict(shapes), ())
    apps = {
        n: _site_app(d, e, allowlist)
        for n, d, e in zip(nodes, deltas, examples, strict=True)
    }
    exact = weighted_mean(deltas, [float(e) for e in examples])

    plain_times, secure_times, errors = [], [], []
    plain_parallel, secure_parallel = [], []
    plain_bytes = secure_bytes = None
    for _ in range(args.repeats):
        grid = LocalGrid(apps, {n: {} for n in nodes}, {})
        start = time.perf_counter()
        replies = grid.send_and_receive(_messages(nodes, shapes))
        mean = weighted_mean(
            [
                from_record(r.content[wire.ADAPTER_DELTA], allowlist.layout)
                for r in replies
            ],
            [float(r.content[wire.METRICS][wire.NUM_EXAMPLES]) for r in replies],
        )
        plain_times.append(time.perf_counter() - start)
        plain_parallel.append(grid.as_if_parallel(plain_times[-1]))
        plain_bytes = grid.traffic
        assert all(np.allclose(mean[k], exact[k], atol=1e-6) for k in shapes)

        grid = LocalGrid(apps, {n: {} for n in nodes}, {})
        plan = plan_quantization(BOUND, len(nodes), max(examples))
        messages = _messages(nodes, shapes)
        for m in messages:
            m.content[wire.CONFIG][wire.SECAGG_MAX_WEIGHT] = plan.max_weight
        start = time.perf_counter()
        result = run_secure_train(
            grid,
            messages,
            server_round=1,
            payload_shapes=dict(shapes),
            settings=SecureAggregationConfig(),
            plan=plan,
            arrays_key=wire.GLOBAL_ADAPTER,
            config_key=wire.CONFIG,
        )
        secure_times.append(time.perf_counter() - start)
        secure_parallel.append(grid.as_if_parallel(secure_times[-1]))
        secure_bytes = grid.traffic
        assert result.mean_delta is not None
        worst = max(
            float(np.max(np.abs(result.mean_delta[k] - exact[k]))) for k in shapes
        )
        errors.append(
            (worst, mean_error_bound(plan, len(nodes), BOUND, result.weight_sum))
        )

    assert plain_bytes is not None and secure_bytes is not None
    up_plain = statistics.mean(plain_bytes.up.values())
    up_secure = statistics.mean(secure_bytes.up.values())
    down_plain = statistics.mean(plain_bytes.down.values())
    down_secure = statistics.mean(secure_bytes.down.values())
    t_plain, t_secure = statistics.median(plain_times), statistics.median(secure_times)
    p_plain, p_secure = (
        statistics.median(plain_parallel),
        statistics.median(secure_parallel),
    )
    figures = {
        "sites": args.sites,
        "adapter_parameters": n_params,
        "adapter_bytes_float32": n_params * 4,
        "plain_round_seconds": t_plain,
        "secagg_round_seconds": t_secure,
        "time_ratio": t_secure / t_plain,
        "plain_round_seconds_sites_parallel": p_plain,
        "secagg_round_seconds_sites_parallel": p_secure,
        "time_ratio_sites_parallel": p_secure / p_plain,
        "plain_upload_bytes_per_site": up_plain,
        "secagg_upload_bytes_per_site": up_secure,
        "upload_ratio": up_secure / up_plain,
        "plain_download_bytes_per_site": down_plain,
        "secagg_download_bytes_per_site": down_secure,
        "max_abs_error": max(e for e, _ in errors),
        "stated_error_bound": min(b for _, b in errors),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(
        f"SecAgg+ vs plain aggregation: {args.sites} sites, {n_params:,} adapter parameters "
        f"({n_params * 4:,} B float32), median of {args.repeats}"
    )
    print(f"{'':28}{'plain':>14}{'SecAgg+':>14}{'ratio':>8}")
    print(
        f"{'round time, sites serial (s)':28}{t_plain:>14.3f}{t_secure:>14.3f}{t_secure / t_plain:>8.2f}"
    )
    print(
        f"{'round time, sites parallel':28}{p_plain:>14.3f}{p_secure:>14.3f}{p_secure / p_plain:>8.2f}"
    )
    print(
        f"{'upload per site (B)':28}{up_plain:>14,.0f}{up_secure:>14,.0f}{up_secure / up_plain:>8.2f}"
    )
    print(
        f"{'download per site (B)':28}{down_plain:>14,.0f}{down_secure:>14,.0f}{down_secure / down_plain:>8.2f}"
    )
    print(
        f"secure mean vs exact weighted mean: max |error| {figures['max_abs_error']:.2e} "
        f"<= stated bound {figures['stated_error_bound']:.2e}"
    )
    print(
        "goal: <= 1.5x time, <= 1.5x bytes: "
        f"time (sites parallel) {'PASS' if p_secure / p_plain <= 1.5 else 'MISS'}, "
        f"bytes {'PASS' if up_secure / up_plain <= 1.5 else 'MISS'}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
