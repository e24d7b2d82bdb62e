"""The egress guard: only the declared adapter tensors and numbers leave a site."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from egress_helpers import (
    LABELS,
    PACKED_SIZE,
    SECRET,
    SHAPES,
    _context,
    _delta,
    _eval_content,
    _fitres_content,
    _message,
    _refusal,
    _train_content,
)
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    RecordDict,
)

from wardround.client.egress import (
    WIRE_METRIC_NAMES,
    EgressAllowlist,
    check_legacy_fitres,
    check_reply,
    pack_payload,
)
from wardround.client.egress_mods import (
    error_sanitizing_mod,
    make_egress_guard_mod,
)
from wardround.client.egress_secagg import check_secagg_reply
from wardround.common import wire
from wardround.common.config import TransportDtype
from wardround.common.errors import (
    DataError,
    PrivacyBudgetExhausted,
    error_kind,
    safe_error_reason,
)
from wardround.common.transport import WIRE_DTYPES, encode
from wardround.flower_compat.constants import ErrorCode
from wardround.flower_compat.legacy import ndarray_to_bytes

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def allowlist() -> EgressAllowlist:
    return EgressAllowlist.for_payload(SHAPES, LABELS)


# --- the allowlist -------------------------------------------------------------------


def test_allowlist_holds_the_wire_metrics_and_the_run_labels_only(allowlist):
    assert (
        wire.NUM_EXAMPLES in WIRE_METRIC_NAMES
        and wire.EVAL_SECONDS in WIRE_METRIC_NAMES
    )
    assert allowlist.tensors == tuple(SHAPES.items())
    assert allowlist.allows_metric(wire.DELTA_L2)
    assert allowlist.allows_metric("auroc.pneumonia")
    assert not allowlist.allows_metric("auroc.fracture")
    assert not allowlist.allows_metric("patient-age")
    extra = EgressAllowlist.for_payload(SHAPES, LABELS, extra_metric_names=["norm_bit"])
    assert extra.allows_metric("norm_bit")


def test_allowlist_rejects_repeated_names_and_an_empty_payload():
    with pytest.raises(ValueError, match="repeat"):
        EgressAllowlist(tensors=(("a", (1,)), ("a", (1,))), metric_names=frozenset())
    with pytest.raises(ValueError, match="at least one"):
        EgressAllowlist.for_payload({}, LABELS)


# --- Message-API replies ---------------------------------------------------------------


def test_a_correct_train_and_evaluate_reply_pass(allowlist):
    check_reply(_train_content(), allowlist, kind="train")
    check_reply(_eval_content(), allowlist, kind="evaluate")


def test_the_allowlist_packs_its_tensors_into_one_array(allowlist):
    assert allowlist.packed_size == PACKED_SIZE
    assert allowlist.layout.names == tuple(sorted(SHAPES))


def test_the_payload_is_packed_by_name_and_shape_not_only_by_length(allowlist):
    packed = pack_payload(_delta(), allowlist)
    assert packed.shape == (PACKED_SIZE,)
    # the same 16 values under another name: the packed length alone would pass
    swapped = _delta()
    swapped["encoder.patient_jane.weight"] = swapped.pop("lora_B.weight")
    reshaped = {**_delta(), "lora_A.weight": np.zeros((3, 2), np.float32)}

    text = _refusal(pack_payload, swapped, allowlist)
    assert "1 tensor(s) not in the adapter allowlist" in text
    assert "missing: ['lora_B.weight']" in text and "patient_jane" not in text
    text = _refusal(pack_payload, reshaped, allowlist)
    assert "'lora_A.weight': shape (3, 2), expected (2, 3)" in text


def test_an_array_beside_the_packed_adapter_is_refused_without_echoing_its_name(
    allowlist,
):
    content = _train_content()
    content[wire.ADAPTER_DELTA]["encoder.patient_jane.weight"] = Array(
        np.zeros(2, np.float32)
    )

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "2 array(s)" in text and "wire version 2 sends one" in text
    assert "patient_jane" not in text


def test_a_per_tensor_record_of_wire_version_1_is_refused(allowlist):
    content = _train_content()
    content[wire.ADAPTER_DELTA] = ArrayRecord(
        {k: Array(v) for k, v in _delta().items()}
    )

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "3 array(s)" in text and "wire version 2 sends one" in text


def test_a_missing_tensor_shortens_the_packed_array_and_is_refused(allowlist):
    delta = _delta()
    del delta["head.bias"]

    text = _refusal(check_reply, _train_content(delta), allowlist, kind="train")

    assert f"shape (12,), expected ({PACKED_SIZE},)" in text


def test_an_extra_or_larger_tensor_lengthens_it_and_is_refused(allowlist):
    extra = {**_delta(), "encoder.patient_jane.weight": np.zeros(2, np.float32)}
    larger = {**_delta(), "lora_A.weight": np.zeros((3, 3), np.float32)}

    for delta, length in ((extra, 18), (larger, 19)):
        text = _refusal(check_reply, _train_content(delta), allowlist, kind="train")
        assert f"shape ({length},), expected ({PACKED_SIZE},)" in text
        assert "patient_jane" not in text


def test_a_float64_tensor_is_refused(allowlist):
    delta = {**_delta(), "head.bias": np.zeros(4, np.float64)}

    text = _refusal(check_reply, _train_content(delta), allowlist, kind="train")

    assert "the packed adapter" in text and "float64" in text


def test_a_nan_in_a_tensor_is_refused(allowlist):
    delta = _delta()
    delta["lora_B.weight"][1, 1] = np.nan

    text = _refusal(check_reply, _train_content(delta), allowlist, kind="train")

    assert "1 non-finite value(s)" in text


@pytest.mark.parametrize("transport", ["float16", "bfloat16"])
def test_a_half_precision_delta_passes_only_where_the_run_says_so(allowlist, transport):
    half = EgressAllowlist.for_payload(
        SHAPES, LABELS, transport=TransportDtype(transport)
    )
    content = _train_content()
    vector = content[wire.ADAPTER_DELTA][wire.PACKED_ADAPTER].numpy()
    content[wire.ADAPTER_DELTA][wire.PACKED_ADAPTER] = Array(
        encode(vector, TransportDtype(transport))
    )

    check_reply(content, half, kind="train")
    text = _refusal(check_reply, content, allowlist, kind="train")
    assert "expected float32" in text
    text = _refusal(check_reply, _train_content(), half, kind="train")
    assert (
        f"expected {WIRE_DTYPES[TransportDtype(transport)].name} ({transport})" in text
    )


def test_a_nan_in_a_bfloat16_delta_is_refused():
    half = EgressAllowlist.for_payload(
        SHAPES, LABELS, transport=TransportDtype.BFLOAT16
    )
    vector = np.zeros(PACKED_SIZE, np.float32)
    vector[3] = np.nan
    content = _train_content()
    content[wire.ADAPTER_DELTA][wire.PACKED_ADAPTER] = Array(
        encode(vector, TransportDtype.BFLOAT16)
    )

    text = _refusal(check_reply, content, half, kind="train")

    assert "1 non-finite value(s)" in text


def test_trailing_bytes_after_an_array_are_refused(allowlist):
    content = _train_content()
    record = content[wire.ADAPTER_DELTA]
    good = record[wire.PACKED_ADAPTER]
    record[wire.PACKED_ADAPTER] = Array(
        dtype=good.dtype,
        shape=good.shape,
        stype=good.stype,
        data=good.data + SECRET.encode(),
    )

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "more than the array's .npy encoding" in text


def test_bytes_hidden_in_the_npy_header_are_refused(allowlist):
    """A header numpy reads but would not write (same length, other spacing)."""
    content = _train_content()
    record = content[wire.ADAPTER_DELTA]
    good = record[wire.PACKED_ADAPTER]
    end = good.data.index(b"\n") + 1
    respaced = good.data[:end].replace(b"{'descr'", b"{ 'descr'").replace(b" \n", b"\n")
    assert len(respaced) == end and respaced != good.data[:end]
    record[wire.PACKED_ADAPTER] = Array(
        dtype=good.dtype,
        shape=good.shape,
        stype=good.stype,
        data=respaced + good.data[end:],
    )

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "more than the array's .npy encoding" in text


def test_a_string_metric_is_refused_without_its_value(allowlist):
    content = _eval_content()
    content[wire.CONFIG] = ConfigRecord({wire.EVAL_LOSS: SECRET})

    text = _refusal(check_reply, content, allowlist, kind="evaluate")

    assert "unexpected ConfigRecord" in text
    assert SECRET not in text


def test_a_string_in_the_legacy_metrics_is_refused_without_its_value(allowlist):
    content = _fitres_content(metrics={wire.TRAIN_LOSS: SECRET})

    text = _refusal(check_legacy_fitres, content, allowlist)

    assert f"'{wire.TRAIN_LOSS}': is a str" in text
    assert SECRET not in text


def test_an_unknown_metric_name_is_refused_without_echoing_it(allowlist):
    content = _eval_content(**{"auroc.jane-doe": 0.9})

    text = _refusal(check_reply, content, allowlist, kind="evaluate")

    assert "not in the schema" in text and "jane-doe" not in text


def test_an_inf_metric_is_refused(allowlist):
    content = _eval_content(**{wire.EVAL_LOSS: float("inf")})

    text = _refusal(check_reply, content, allowlist, kind="evaluate")

    assert f"'{wire.EVAL_LOSS}': not finite" in text


def test_a_list_metric_is_refused(allowlist):
    content = _eval_content(**{wire.EVAL_LOSS: [0.1, 0.2]})

    text = _refusal(check_reply, content, allowlist, kind="evaluate")

    assert "is a list" in text


def test_an_extra_config_record_in_a_train_reply_is_refused(allowlist):
    content = _train_content()
    content["notes"] = ConfigRecord({"n": 1})

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "unexpected ConfigRecord" in text


def test_an_evaluate_reply_may_not_carry_tensors(allowlist):
    content = _eval_content()
    content[wire.ADAPTER_DELTA] = ArrayRecord(
        {"head.bias": Array(np.zeros(4, np.float32))}
    )

    _refusal(check_reply, content, allowlist, kind="evaluate")


def test_every_problem_is_reported_at_once(allowlist):
    delta = {**_delta(), "head.bias": np.zeros(4, np.float64)}
    content = _train_content(delta, **{wire.TRAIN_LOSS: float("nan")})

    text = _refusal(check_reply, content, allowlist, kind="train")

    assert "(2 problem(s))" in text


# --- legacy FitRes ---------------------------------------------------------------------


def test_a_correct_legacy_fitres_passes(allowlist):
    check_legacy_fitres(_fitres_content(), allowlist)


def test_legacy_fitres_with_unpacked_arrays_is_refused(allowlist):
    content = _fitres_content()
    content["fitres.parameters"] = ArrayRecord(
        {str(i): Array(v) for i, v in enumerate(_delta().values())}
    )

    text = _refusal(check_legacy_fitres, content, allowlist)

    assert "3 array(s)" in text and f"expected ({PACKED_SIZE},)" in text


def test_legacy_fitres_with_a_nan_is_refused(allowlist):
    arrays = _delta()
    arrays["head.bias"][0] = np.inf

    text = _refusal(check_legacy_fitres, _fitres_content(arrays), allowlist)

    assert "non-finite" in text


def test_legacy_fitres_status_message_must_be_fixed(allowlist):
    content = _fitres_content()
    content["fitres.status"] = ConfigRecord({"code": 0, "message": SECRET})

    text = _refusal(check_legacy_fitres, content, allowlist)

    assert "'fitres.status'" in text and SECRET not in text


def test_legacy_fitres_with_an_extra_array_is_refused(allowlist):
    content = _fitres_content()
    content["fitres.parameters"]["1"] = Array(np.zeros(2, np.float32))

    text = _refusal(check_legacy_fitres, content, allowlist)

    assert "2 array(s)" in text and "wire version 2 sends one" in text


# --- SecAgg+ replies --------------------------------------------------------------------


def _collect_content(blobs: list[bytes]) -> RecordDict:
    content = _fitres_content()
    for record in content.array_records.values():
        record.clear()
    content["secaggplus_configs"] = ConfigRecord({"masked_params": blobs})
    return content


def _masked_blobs(count_extra: int = 0) -> list[bytes]:
    rng = np.random.default_rng(1)
    arrays = [np.array([7]), rng.integers(0, 2**20, PACKED_SIZE)]
    arrays += [np.zeros(3, np.int64)] * count_extra
    return [ndarray_to_bytes(a) for a in arrays]


def test_a_correct_masked_vectors_reply_passes(allowlist):
    check_secagg_reply(
        _collect_content(_masked_blobs()), allowlist, "collect_masked_vectors"
    )


def test_a_masked_vectors_reply_with_an_extra_array_is_refused(allowlist):
    content = _collect_content(_masked_blobs(count_extra=1))

    text = _refusal(check_secagg_reply, content, allowlist, "collect_masked_vectors")

    assert "3 masked array(s), expected 2" in text


def test_a_masked_vectors_reply_with_float_arrays_is_refused(allowlist):
    blobs = _masked_blobs()
    blobs[1] = ndarray_to_bytes(np.zeros(PACKED_SIZE, np.float32))

    text = _refusal(
        check_secagg_reply, _collect_content(blobs), allowlist, "collect_masked_vectors"
    )

    assert "masked array 1 (the packed adapter)" in text and "integers" in text


def test_secagg_keys_of_another_stage_are_refused():
    content = RecordDict(
        {"secaggplus_configs": ConfigRecord({"nids": [1], "shares": [b"s"]})}
    )

    text = _refusal(check_secagg_reply, content, None, "share_keys")

    assert "'dsts' missing" in text


# --- the mods ---------------------------------------------------------------------------


def test_the_guard_passes_a_correct_reply(allowlist):
    guard = make_egress_guard_mod(lambda msg, ctx: allowlist)
    msg = _message("train")

    reply = guard(msg, _context(), lambda m, c: Message(_train_content(), reply_to=m))

    assert not reply.has_error()
    assert set(reply.content.keys()) == {wire.ADAPTER_DELTA, wire.METRICS}


def test_the_guard_replies_with_an_error_and_logs_without_the_value(
    allowlist, tmp_path, caplog
):
    log_path = tmp_path / "egress" / "violations.jsonl"
    guard = make_egress_guard_mod(lambda msg, ctx: allowlist, violations_log=log_path)
    msg = _message("evaluate")
    content = _eval_content()
    content["leak"] = ConfigRecord({"note": SECRET})

    with caplog.at_level(logging.ERROR, logger="wardround.egress"):
        reply = guard(msg, _context(), lambda m, c: Message(content, reply_to=m))

    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert error_kind(reply.error.reason) == "EgressViolation"
    assert SECRET not in reply.error.reason
    lines = log_path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (
        entry["message_type"] == "evaluate"
        and "unexpected ConfigRecord" in entry["violation"]
    )
    assert SECRET not in lines[0]
    assert "egress refused" in caplog.text and SECRET not in caplog.text


def test_the_guard_passes_error_replies_and_refuses_unknown_message_types(allowlist):
    guard = make_egress_guard_mod(lambda msg, ctx: allowlist)
    msg = _message("train")
    failed = guard(
        msg, _context(), lambda m, c: error_sanitizing_mod(m, c, _raise_with_data)
    )
    assert failed.has_error()

    query = _message("query")
    reply = guard(query, _context(), lambda m, c: Message(_eval_content(), reply_to=m))
    assert reply.has_error() and "no egress allowlist" in reply.error.reason


def _raise_with_data(msg, ctx):
    raise ValueError(f"could not parse row: {SECRET}")


def _raise_data_error(msg, ctx):
    raise DataError("no rows")


def test_safe_error_reason_hides_foreign_exception_text():
    reason = safe_error_reason(ValueError(f"bad row {SECRET}"))

    assert SECRET not in reason
    assert error_kind(reason) == "ValueError"


def test_safe_error_reason_keeps_wardround_text_with_a_parsable_kind():
    reason = safe_error_reason(PrivacyBudgetExhausted("epsilon 8.0 is spent", hint="x"))

    assert (
        reason
        == "[PrivacyBudgetExhausted] privacy budget exhausted: epsilon 8.0 is spent"
    )
    assert error_kind(reason) == "PrivacyBudgetExhausted"
    assert error_kind("<class 'ValueError'>:<'boom'>") is None
    assert error_kind(None) is None


def test_the_error_sanitizing_mod_replies_with_the_safe_reason(caplog):
    msg = _message("train")

    with caplog.at_level(logging.ERROR, logger="wardround.egress"):
        reply = error_sanitizing_mod(msg, _context(), _raise_with_data)
        data_reply = error_sanitizing_mod(msg, _context(), _raise_data_error)

    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert (
        reply.error.reason.startswith("[ValueError] ")
        and SECRET not in reply.error.reason
    )
    assert SECRET in caplog.text  # the full exception stays in the local log
    assert data_reply.error.reason == "[DataError] data error: no rows"


def test_a_structured_array_is_never_the_exact_encoding_of_its_bytes():
    """Its padding bytes are in the data but in no field: they could carry anything."""
    from wardround.client.egress import _decode
    from wardround.common.npy import npy_bytes

    padded = np.dtype(
        {"names": ["a"], "formats": ["<u4"], "offsets": [0], "itemsize": 8}
    )
    data = bytearray(npy_bytes(np.zeros(2, dtype=padded)))
    data[-4:] = SECRET.encode()[:4]

    decoded = _decode(bytes(data))

    assert decoded is not None and decoded[1] is False
