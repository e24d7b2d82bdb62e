"""The egress log: its newest lines are read from the tail, whatever its size."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.client.egress_log import _tail, read_egress, record_egress


def _record(path, i: int, run: str = "run") -> None:
    record_egress(
        path,
        run_id=f"{run}-{i}",
        server_round=i,
        message_type="train",
        ok=True,
        bytes_in=1,
        bytes_out=2,
        seconds=0.5,
        tensors=["delta/head.weight"],
        metrics={"num-examples": 10.0},
    )


def test_the_newest_tasks_come_from_the_tail(tmp_path):
    path = tmp_path / "egress.jsonl"
    for i in range(500):
        _record(path, i)

    newest = read_egress(path, limit=7)

    assert [row["round"] for row in newest] == list(range(493, 500))
    assert read_egress(path)[-7:] == newest


def test_a_coordinators_run_name_is_kept_short_and_printable(tmp_path):
    path = tmp_path / "egress.jsonl"
    _record(path, 1, run="r\x1b[2J" + "x" * 1_000_000)

    line = path.read_text()
    assert len(line) < 1000
    assert json.loads(line)["run_id"].startswith("r[2Jxxx")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet="ab\n", max_size=40), max_size=30),
    st.integers(1, 12),
    st.integers(1, 64),
)
def test_the_tail_holds_the_last_lines(tmp_path_factory, chunks, lines, block):
    path = tmp_path_factory.mktemp("tail") / "f"
    text = "".join(chunks)
    path.write_text(text)

    assert _tail(path, lines, block=block) == text.splitlines()[-lines:]
