"""What left the site, task by task: ``<state-dir>/egress.jsonl``.

The site daemon appends one line per ClientApp task after its reply was pushed:
the run, the round, the message type, the names of the tensors in the reply, the
bytes sent and the numeric metrics that passed the egress guard. It is what the
site dashboard's "Sent" page shows. Names and numbers only: the reply already
passed :mod:`wardround.client.egress`, and nothing here is read from patient data.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..ops.audit_fields import coordinator_label

EGRESS_FILE = "egress.jsonl"


def record_egress(
    path: Path,
    *,
    run_id: str,
    flower_run_id: int | None = None,
    server_round: int | None,
    message_type: str,
    ok: bool,
    bytes_in: int,
    bytes_out: int,
    seconds: float,
    tensors: Sequence[str],
    metrics: Mapping[str, float],
) -> None:
    """Append one task's line (0600, created on first use)."""
    line = {
        "time": time.time(),
        "run_id": coordinator_label(run_id),
        # the site's own record of which Flower run it was: the name is the
        # coordinator's word
        "flower_run_id": None if flower_run_id is None else int(flower_run_id),
        "round": server_round,
        "message_type": coordinator_label(message_type),
        "ok": bool(ok),
        "bytes_in": int(bytes_in),
        "bytes_out": int(bytes_out),
        "seconds": round(float(seconds), 3),
        "tensors": [str(t) for t in tensors],
        "metrics": {
            str(k): float(v) for k, v in metrics.items() if math.isfinite(float(v))
        },
    }
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def read_egress(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The recorded tasks, oldest first (the newest ``limit``); torn lines skipped.

    With ``limit`` only the file's tail is read (one line more, for a torn last
    one): a page shows the newest tasks of a log that grows with every task.
    """
    try:
        lines = (
            _tail(Path(path), limit + 1)
            if limit
            else Path(path).read_text().splitlines()
        )
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows[-limit:] if limit else rows


def _tail(path: Path, lines: int, block: int = 1 << 16) -> list[str]:
    """The file's last ``lines`` whole lines (fewer if it has fewer), read backwards."""
    chunks: list[bytes] = []
    newlines = 0
    with path.open("rb") as handle:
        start = handle.seek(0, os.SEEK_END)
        while start > 0 and newlines <= lines:
            size = min(block, start)
            start -= size
            handle.seek(start)
            chunk = handle.read(size)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    if start > 0:
        data = data[data.index(b"\n") + 1 :]  # the first line may be cut
    return [line.decode("utf-8", "replace") for line in data.splitlines()[-lines:]]


def reply_tensor_names(content: Any) -> list[str]:
    """The tensors a Flower reply carries: ArrayRecord keys and byte-valued config entries."""
    names: list[str] = []
    for record_name, record in content.array_records.items():
        names.extend(f"{record_name}/{key}" for key in record.keys())
    for record_name, record in content.config_records.items():
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            if items and all(isinstance(item, bytes) for item in items):
                names.append(f"{record_name}/{key}")
    return names
