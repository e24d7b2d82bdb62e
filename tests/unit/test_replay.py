"""The site's kept answers: which repeats may be answered again, and the store."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import numpy as np
import pytest

from wardround.client.answers import AnswerKind
from wardround.client.replay import (
    KEPT_RUNS,
    RELEASES_FOLDER,
    ReleaseStore,
    replayable,
    request_digest,
)
from wardround.common.packing import AdapterLayout

TRAIN, EVALUATE = AnswerKind.TRAIN, AnswerKind.EVALUATE
RUN, OTHER_RUN = "0" * 32, "f" * 32
METRICS = {"num-examples": 40, "dp-epsilon-run": 3.25, "train-loss": 0.6931}


def test_only_answers_seen_in_the_clear_are_answered_again():
    # A masked update's only protection from the coordinator is the sum it is
    # hidden in: sent again into another sum, it could be taken out.
    assert replayable(masked=False, simulation=False)
    assert not replayable(masked=True, simulation=False)
    # a simulation counts nothing and keeps nothing
    assert not replayable(masked=False, simulation=True)


def _state(seed: int = 0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict(
        [
            ("a.lora_A", rng.normal(size=(4, 3)).astype(np.float32)),
            ("b.lora_B", rng.normal(size=(3, 4)).astype(np.float32)),
        ]
    )


def _digest(state, kind=TRAIN, run=RUN, server_round=1, policy="{}"):
    return request_digest(
        kind,
        run,
        server_round,
        policy=policy,
        layout=AdapterLayout.of_state(state),
        global_state=state,
    )


def test_the_question_is_the_run_kind_round_channel_and_every_adapter_bit():
    state = _state()
    base = _digest(state)
    assert _digest(_state()) == base  # the same question, built again
    nudged = _state()
    nudged["b.lora_B"][2, 3] = np.nextafter(nudged["b.lora_B"][2, 3], np.inf)
    others = {
        _digest(nudged),
        _digest(state, kind=EVALUATE),
        _digest(state, run=OTHER_RUN),
        _digest(state, server_round=2),
        _digest(state, policy='{"decimals": 2}'),
    }
    assert base not in others and len(others) == 5


def test_a_kept_answer_is_found_only_for_its_question(tmp_path):
    store = ReleaseStore(tmp_path)
    packed = np.arange(24, dtype=np.float32)
    store.keep(TRAIN, RUN, 1, "q1", METRICS, packed)
    store.keep(EVALUATE, RUN, 1, "e1", {"auroc-macro": 0.71})

    found = store.find(TRAIN, RUN, "q1", payload_size=24)
    assert found is not None and found.server_round == 1
    assert found.metrics == METRICS
    assert found.packed is not None and found.packed.tobytes() == packed.tobytes()
    assert store.find(TRAIN, RUN, "q2", payload_size=24) is None
    assert store.find(TRAIN, OTHER_RUN, "q1", payload_size=24) is None
    assert store.find(EVALUATE, RUN, "e1") is not None
    assert store.holds(TRAIN, RUN) and not store.holds(TRAIN, OTHER_RUN)
    with pytest.raises(ValueError, match="run key"):
        store.holds(TRAIN, "../elsewhere")
    # the next round's answer replaces it: only the latest is kept
    store.keep(TRAIN, RUN, 2, "q2", METRICS, packed + 1)
    assert store.find(TRAIN, RUN, "q1", payload_size=24) is None
    again = store.find(TRAIN, RUN, "q2", payload_size=24)
    assert again is not None and again.server_round == 2
    for path in (tmp_path / RELEASES_FOLDER / RUN).iterdir():
        assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "damage",
    ["truncated payload", "changed payload", "wrong size", "bad description"],
)
def test_a_damaged_kept_answer_is_never_sent(tmp_path, caplog, damage):
    store = ReleaseStore(tmp_path)
    store.keep(TRAIN, RUN, 1, "q1", METRICS, np.arange(24, dtype=np.float32))
    folder = tmp_path / RELEASES_FOLDER / RUN
    payload, meta = folder / "train.npy", folder / "train.json"
    size = 24
    if damage == "truncated payload":
        payload.write_bytes(payload.read_bytes()[:-8])
    elif damage == "changed payload":
        np.save(payload, np.arange(24, dtype=np.float32)[::-1].copy())
    elif damage == "wrong size":
        size = 25
    else:
        meta.write_text(meta.read_text().replace("3.25", '"3.25"'))
    with caplog.at_level(logging.WARNING, logger="wardround.client.replay"):
        assert store.find(TRAIN, RUN, "q1", payload_size=size) is None
    assert "answering anew" in caplog.text


def test_only_the_latest_runs_are_kept(tmp_path):
    store = ReleaseStore(tmp_path)
    runs = [f"{i:032x}" for i in range(KEPT_RUNS + 2)]
    for age, run in enumerate(runs):
        store.keep(EVALUATE, run, 0, "e", {"auroc-macro": 0.5})
        past = time.time() - 1000 + age
        os.utime(tmp_path / RELEASES_FOLDER / run, (past, past))
    store.keep(EVALUATE, runs[0], 1, "e2", {"auroc-macro": 0.6})

    kept = sorted(p.name for p in (tmp_path / RELEASES_FOLDER).iterdir())
    # the run just answered, and the KEPT_RUNS - 1 most recent others
    assert kept == sorted([runs[0], *runs[-(KEPT_RUNS - 1) :]])


def test_folders_are_private_and_a_write_cut_short_is_cleared(tmp_path):
    store = ReleaseStore(tmp_path / "ledger")
    store.keep(EVALUATE, RUN, 0, "e", {"auroc-macro": 0.5})
    folder = tmp_path / "ledger" / RELEASES_FOLDER
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / RUN).stat().st_mode & 0o777 == 0o700
    left = folder / RUN / "train.abc123.partial"
    left.write_bytes(b"half an adapter")
    store.keep(TRAIN, RUN, 1, "q", METRICS, np.zeros(4, dtype=np.float32))
    assert not left.exists()
    assert sorted(p.name for p in (folder / RUN).iterdir()) == [
        "evaluate.json",
        "train.json",
        "train.npy",
    ]


def test_racing_repeats_cannot_send_one_answer_more_than_max_replays_times(tmp_path):
    import threading

    from wardround.client.replay import MAX_REPLAYS
    from wardround.common.errors import AnswerRefused

    store = ReleaseStore(tmp_path)
    store.keep(EVALUATE, RUN, 2, "e", {"auroc-macro": 0.5})
    claimed: list[int] = []
    refused: list[str] = []

    def repeat() -> None:
        try:
            claimed.append(ReleaseStore(tmp_path).claim_replay(EVALUATE, RUN, "e"))
        except AnswerRefused as error:
            refused.append(error.message)

    threads = [threading.Thread(target=repeat) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(1, MAX_REPLAYS + 1))
    assert len(refused) == 12 - MAX_REPLAYS
    assert all(f"again {MAX_REPLAYS} times" in why for why in refused)
    # an answer replaced meanwhile is not sent: refused, with what to check
    store.keep(EVALUATE, RUN, 3, "e3", {"auroc-macro": 0.6})
    with pytest.raises(AnswerRefused, match="could not count"):
        store.claim_replay(EVALUATE, RUN, "e")
