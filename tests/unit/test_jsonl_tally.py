"""The running totals behind the site's /metrics equal a fold over the whole log."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from wardround.client.dashboard.log_totals import TaskTotals, fold_task
from wardround.client.dashboard.tally import JsonlTally


def _count(total: list[int], row: dict) -> None:
    total.append(int(row["n"]))


def _whole_file(path: Path) -> list[int]:
    rows = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(int(row["n"]))
    return rows


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 10**6), max_size=30),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
)
def test_reading_as_the_file_grows_equals_reading_it_whole(
    tmp_path_factory, values, cuts
):
    """Appends read at any byte boundary, half lines included, count every line once."""
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    text = b"".join(json.dumps({"n": v}).encode() + b"\n" for v in values)
    text += b"not json\n" + b'["a list"]\n'
    tally = JsonlTally(path, list, _count)
    assert tally.total() == []
    written = 0
    for cut in sorted(min(c, len(text)) for c in cuts) + [len(text)]:
        with path.open("ab") as handle:
            handle.write(text[written:cut])
        written = max(written, cut)
        complete = text[: text.rfind(b"\n", 0, written) + 1]
        assert tally.total() == [
            json.loads(line)["n"]
            for line in complete.splitlines()
            if line.startswith(b"{")
        ]
    assert tally.total() == values == _whole_file(path)


def test_a_replaced_or_shortened_log_is_read_again_from_its_start(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n')
    tally = JsonlTally(path, list, _count)
    assert tally.total() == [1, 2]
    path.write_text('{"n": 3}\n')  # same inode, shorter
    assert tally.total() == [3]
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"n": 4}\n{"n": 5}\n{"n": 6}\n')
    replacement.replace(path)  # another inode, longer
    assert tally.total() == [4, 5, 6]
    path.unlink()
    assert tally.total() == []


def test_the_total_handed_out_is_a_copy(tmp_path):
    path = tmp_path / "egress.jsonl"
    path.write_text(
        json.dumps({"message_type": "train", "ok": True, "bytes_out": 7}) + "\n"
    )
    tally = JsonlTally(path, TaskTotals, fold_task)
    first = tally.total()
    first.counts[("train", "true")] = 99
    first.bytes_out = 0
    again = tally.total()
    assert again.counts == {("train", "true"): 1} and again.bytes_out == 7


def test_a_mangled_field_counts_the_task_and_no_bytes(tmp_path):
    path = tmp_path / "egress.jsonl"
    path.write_text(
        json.dumps({"message_type": "train", "ok": True, "bytes_out": "x", "seconds": None}) + "\n"
        + json.dumps({"message_type": "train", "ok": False, "bytes_out": 5, "seconds": 1.5}) + "\n"
    )  # fmt: skip
    totals = JsonlTally(path, TaskTotals, fold_task).total()
    assert totals.counts == {("train", "true"): 1, ("train", "false"): 1}
    assert totals.bytes_out == 5 and totals.durations == {"train": (2, 1.5)}


def test_a_log_rewritten_in_place_is_read_again(tmp_path):
    """Same inode, at least as long: a restored backup or a copy-truncate rotation."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n')
    tally = JsonlTally(path, list, _count)
    assert tally.total() == [1, 2]
    with path.open("r+") as handle:  # rewritten through the same inode
        handle.write('{"n": 7}\n{"n": 8}\n{"n": 9}\n')
    assert tally.total() == [7, 8, 9]
    with path.open("a") as handle:
        handle.write('{"n": 10}\n')
    assert tally.total() == [7, 8, 9, 10]
