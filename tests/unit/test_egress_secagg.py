"""The egress guard against Flower's own SecAgg+ mod, stage by stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from egress_helpers import (
    LABELS,
    SHAPES,
    _context,
    _delta,
    _fitres_content,
    _message,
)
from flwr.app import (
    ConfigRecord,
    Message,
    RecordDict,
)

from wardround.client.egress import (
    EgressAllowlist,
)
from wardround.client.egress_mods import (
    error_sanitizing_mod,
    make_egress_guard_mod,
    site_mods,
)
from wardround.common.errors import (
    error_kind,
)
from wardround.flower_compat.secagg_protocol import make_ffn, secaggplus_mod

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def allowlist() -> EgressAllowlist:
    return EgressAllowlist.for_payload(SHAPES, LABELS)


# --- against Flower's own SecAgg+ mod -----------------------------------------------


def _secagg_message(node_id: int, configs: dict) -> Message:
    return _message(
        "train", RecordDict({"secaggplus_configs": ConfigRecord(configs)}), node_id
    )


def _legacy_train(arrays):
    def handler(msg, ctx):
        return Message(_fitres_content(arrays), reply_to=msg)

    return handler


def _run_secagg_round(allowlist, arrays_for, tmp_path, mods=None):
    """Three sites (the fewest a site accepts) through Flower's four SecAgg+ stages,
    the guard outside and inside."""
    nodes = (11, 12, 13)
    log_path = tmp_path / "violations.jsonl"
    mods = mods or site_mods(
        lambda m, c: allowlist, precheck=lambda m, c: None, violations_log=log_path
    )
    apps = {n: make_ffn(_legacy_train(arrays_for(n)), mods) for n in nodes}
    contexts = {n: _context(n) for n in nodes}
    setup = {
        "stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2,
        "clipping_range": 8.0, "target_range": 2**16, "mod_range": 2**24,
        "max_weight": 1000.0,
    }  # fmt: skip
    replies = {n: apps[n](_secagg_message(n, dict(setup)), contexts[n]) for n in nodes}
    keys = {
        str(n): [r.content["secaggplus_configs"][k] for k in ("pk1", "pk2")]
        for n, r in replies.items()
    }
    shares = {
        n: apps[n](_secagg_message(n, {"stage": "share_keys", **keys}), contexts[n])
        for n in nodes
    }
    inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in nodes}
    for src, reply in shares.items():
        configs = reply.content["secaggplus_configs"]
        for dst, ctxt in zip(configs["dsts"], configs["ctxts"], strict=True):
            inbox[dst][0].append(src)
            inbox[dst][1].append(ctxt)
    collect = {
        n: apps[n](
            _secagg_message(
                n,
                {
                    "stage": "collect_masked_vectors",
                    "srcs": inbox[n][0],
                    "ctxts": inbox[n][1],
                },
            ),
            contexts[n],
        )
        for n in nodes
    }
    unmask_configs = {"stage": "unmask", "active_nids": list(nodes), "dead_nids": []}
    unmask = {
        n: apps[n](_secagg_message(n, dict(unmask_configs)), contexts[n]) for n in nodes
    }
    return [
        *replies.values(),
        *shares.values(),
        *collect.values(),
        *unmask.values(),
    ], log_path


def test_the_mod_order_is_pinned(allowlist):
    mods = site_mods(lambda m, c: allowlist, precheck=lambda m, c: None)

    assert [m.__name__ for m in mods] == [
        "error_sanitizing_mod",
        "egress_guard_mod",
        "secure_aggregation_mod",
        "egress_guard_mod",
    ]


def test_flowers_secagg_replies_pass_the_guard_at_every_stage(allowlist, tmp_path):
    replies, log_path = _run_secagg_round(allowlist, lambda n: _delta(), tmp_path)

    assert [r.has_error() for r in replies] == [False] * 12
    assert not log_path.exists()


def test_a_nan_delta_under_secagg_is_refused_before_masking(allowlist, tmp_path):
    def arrays_for(node):
        arrays = _delta()
        if node == 12:
            arrays["lora_A.weight"][0, 0] = np.nan
        return arrays

    replies, log_path = _run_secagg_round(allowlist, arrays_for, tmp_path)

    collect_11, collect_12, collect_13 = replies[6:9]
    assert not collect_11.has_error() and not collect_13.has_error()
    assert collect_12.has_error() and "non-finite" in collect_12.error.reason
    assert error_kind(collect_12.error.reason) == "EgressViolation"
    assert (
        "legacy FitRes" in json.loads(log_path.read_text().splitlines()[0])["violation"]
    )


def test_the_outer_guard_checks_flowers_masked_vectors(tmp_path):
    declared = EgressAllowlist.for_payload({**SHAPES, "lora_C.weight": (2,)}, LABELS)
    outer_only = [
        error_sanitizing_mod,
        make_egress_guard_mod(lambda m, c: declared),
        secaggplus_mod,
    ]

    replies, _ = _run_secagg_round(declared, lambda n: _delta(), tmp_path, outer_only)

    assert [r.has_error() for r in replies] == [False] * 6 + [True] * 3 + [False] * 3
    reason = replies[6].error.reason
    assert "masked array 1 (the packed adapter): shape (16,), expected (18,)" in reason
