"""What a site answers, and how often: the site's answer policy and answer log.

Every reply is an answer about the site's patients: a trained update, a loss, an
AUROC on its validation patients. The coordinator chooses the questions; the site
chooses what it answers (``[answers]`` in ``site.toml``):

- which per-site metrics leave (privacy accounting always does: it is a function
  of the plan, not of the data), floats rounded to ``decimals``, example counts
  rounded *up* to ``count-granularity``;
- under SecAgg+ the per-site training metrics stay home (the coordinator is meant
  to see only the sum);
- how often: at most ``federation.rounds`` trainings and ``rounds + 1``
  evaluations (one before training, one per round) for a run the site approved,
  plus ``repeatable-rounds`` of each (round numbers stay within the run, so
  the extras can only go to rounds asked again), counted in an
  append-only file that outlives processes and restarts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..common import wire
from ..common.errors import AnswerRefused, DataError
from ..sitedata.site_config import SiteAnswers

ANSWER_LOG = "answers.jsonl"


class AnswerKind(StrEnum):
    """The two questions a coordinator asks a site."""

    TRAIN = "train"
    EVALUATE = "evaluate"


def answer_limit(kind: AnswerKind, approved_rounds: int, repeatable: int = 0) -> int:
    """How many answers of ``kind`` one approved run gets."""
    base = approved_rounds if kind is AnswerKind.TRAIN else approved_rounds + 1
    return base + repeatable


def _train_once_reason(server_round: int) -> str:
    # Retrained from the same adapter with the same seed, the update would be the
    # same bits; masked again among other partners, two masked sums would differ
    # by this site's update alone.
    return (
        f"this site has trained round {server_round} of this run under SecAgg+ "
        "without DP, and answers such a round once: masks are its update's only "
        "protection, and a second masked sum could give the update away"
    )


def coarsen_metrics(
    metrics: Mapping[str, float | int],
    policy: SiteAnswers,
    *,
    secure_aggregation: bool,
    private: bool = False,
) -> dict[str, float | int]:
    """The metrics the site's policy lets leave, as coarse as it says.

    Pure: a metric not listed is dropped (accounting aside), floats are rounded to
    ``policy.decimals``, counts rounded up to ``policy.count_granularity``. Under
    SecAgg+ the per-site training metrics are dropped whatever the list says; in a
    DP round (``private``) those computed outside DP-SGD's noise are.
    """
    allowed = set(policy.metrics)
    per_label = wire.AUROC_PER_LABEL in allowed
    out: dict[str, float | int] = {}
    for name, value in metrics.items():
        if (
            name in wire.ACCOUNTING_METRICS
            or name in wire.PROTOCOL_METRICS
            or name == wire.SITE_INDEX
        ):
            out[name] = value
            continue
        listed = name in allowed or (per_label and name.startswith(wire.AUROC_PREFIX))
        if not listed:
            continue
        if secure_aggregation and name in wire.PER_SITE_TRAINING_METRICS:
            continue
        if private and name in wire.OUTSIDE_DP_TRAINING_METRICS:
            continue
        if name in wire.COUNT_METRICS:
            step = policy.count_granularity
            out[name] = int(math.ceil(int(value) / step) * step)
        elif isinstance(value, bool) or isinstance(value, int):
            out[name] = int(value)
        else:
            out[name] = round(float(value), policy.decimals)
    return out


@dataclass(frozen=True)
class Admission:
    """One admitted answer: its place in the run's allowance."""

    kind: AnswerKind
    run: str
    server_round: int
    number: int
    """1 for the run's first answer of this kind."""
    limit: int


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class AnswerLog:
    """Counts a site's answers per approved run; append-only, ``flock``-ed, fsync'ed.

    One file per site (beside the privacy ledger). A line whose checksum does not
    match stops the site from answering until an operator restores the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def admit(
        self,
        kind: AnswerKind,
        run: str,
        server_round: int,
        approved_rounds: int,
        *,
        repeatable: int = 0,
        once_per_round: bool = False,
    ) -> Admission:
        """Record one answer of ``kind`` for ``run``, or refuse it (AnswerRefused).

        Check and record happen under one lock: two messages racing for the last
        answer cannot both get it. ``once_per_round``: a round already answered is
        refused (a masked update without DP: see :func:`_train_once_reason`).
        """
        limit = answer_limit(kind, approved_rounds, repeatable)
        first_round = 1 if kind is AnswerKind.TRAIN else 0
        if not first_round <= server_round <= approved_rounds:
            raise AnswerRefused(
                f"the coordinator asks for {kind.value} round {server_round}; the run "
                f"this site approved has rounds {first_round}..{approved_rounds}",
                hint="A run that needs more rounds is a new run for the site to approve.",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = _read_all(fd)
            mine = [
                entry
                for entry in self._parse(raw)
                if entry["kind"] == kind.value and entry["run"] == run
            ]
            given = len(mine)
            if once_per_round and any(e["round"] == server_round for e in mine):
                raise AnswerRefused(
                    _train_once_reason(server_round),
                    hint="Under SecAgg+ without DP a round that runs again (after the "
                    "coordinator's restart) stops the run; the rounds left are a new "
                    "run for the sites to approve.",
                )
            if given >= limit:
                raise AnswerRefused(
                    f"this site has answered {given} {kind.value} message(s) for this "
                    f"run, the most the approved run allows ({limit}: "
                    + (
                        "one per approved round"
                        if kind is AnswerKind.TRAIN
                        else "one before training and one per approved round"
                    )
                    + (f", and {repeatable} repeatable" if repeatable else "")
                    + ")",
                    hint="A run that needs more is a new run for the site to approve.",
                )
            body = {
                "kind": kind.value,
                "run": run,
                "round": int(server_round),
                "time": time.time(),
            }
            line = json.dumps({**body, "sha256": _digest(body)}, sort_keys=True)
            tail = raw[raw.rfind(b"\n") + 1 :]
            if tail and not _valid(tail):
                os.ftruncate(fd, len(raw) - len(tail))  # a torn append: cut it off
            elif tail:
                line = "\n" + line
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return Admission(kind, run, server_round, given + 1, limit)

    def entries(self) -> list[dict[str, Any]]:
        """Every answer recorded, in order."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._parse(_read_all(fd))
        finally:
            os.close(fd)

    def _parse(self, raw: bytes) -> list[dict[str, Any]]:
        entries = []
        lines = raw.split(b"\n")
        tail = lines.pop()
        if tail and _valid(tail):  # else a crash mid-append: never given
            lines.append(tail)
        for number, line in enumerate(lines, start=1):
            if not _valid(line):
                raise DataError(
                    f"answer log {self.path} is damaged at line {number}",
                    hint="Restore it from a backup; this site answers nothing until "
                    "then (it is the record of how often it was asked).",
                )
            entries.append(json.loads(line))
        return entries


def _valid(line: bytes) -> bool:
    try:
        entry = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(entry, dict):
        return False
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return (
        entry.get("sha256") == _digest(body)
        and entry.get("kind") in tuple(AnswerKind)
        and isinstance(entry.get("run"), str)
    )


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
