"""A question the site has answered in the clear gets the same answer again, free.

A coordinator that restarts mid-round resumes the run from its last checkpoint
and asks the round again: the same run, the same round, the same global adapter.
Trained again, the site would spend a second round of epsilon and a second answer
of the run's allowance on it, and a DP run would then stop short of its last
round. Sending again an answer the coordinator has already seen reveals nothing
new, so a deployed site keeps its latest plain answer per run and kind (beside
its ledger), and a repeat of exactly that question gets exactly that answer: no
training, no ledger line, no answer counted.

Never for an answer that left masked under SecAgg+. The coordinator is meant to
see only the masked sum; sent again into a round whose sum leaves a partner out,
the same update would be the difference of two sums. A masked repeat is trained
anew: with DP, on fresh noise, charged and counted as any answer; without DP a
retrained update would be the same bits, so the site refuses to answer such a
round twice (:meth:`~wardround.client.answers.AnswerLog.admit`).

Which question: the site's own identity of the run (what it approved), the kind,
the round, the site's ``[answers]`` policy (a tightened policy is a new
question), and the global adapter's bytes in the adapter's layout. The message's
run name and other settings are not part of it: the site answers from what it
approved, not from them.
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import AnswerRefused
from ..common.packing import AdapterLayout
from .answers import AnswerKind

log = logging.getLogger(__name__)

RELEASES_FOLDER = "releases"
KEPT_RUNS = 4
"""Runs whose latest answers are kept; an older run's repeat is trained and counted."""
MAX_REPLAYS = 5
"""How often one kept answer is sent again: a coordinator restarting more often
within one round is broken, or asking the site to upload and log without end."""
_FORMAT = 1
_RUN_KEY = re.compile(r"[0-9a-f]{32}")

_replayed: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "wardround_replayed_round", default=None
)


def replayable(*, masked: bool, simulation: bool) -> bool:
    """Whether a repeat of an answer may be answered from the store.

    Only answers the coordinator saw in the clear (evaluation metrics always
    are); never in a simulation (the researcher runs both sides, and nothing is
    counted there).
    """
    return not simulation and not masked


def request_digest(
    kind: AnswerKind,
    run: str,
    server_round: int,
    *,
    policy: str,
    layout: AdapterLayout,
    global_state: Mapping[str, np.ndarray],
) -> str:
    """The SHA-256 naming one question: run, kind, round, policy and adapter bytes."""
    digest = hashlib.sha256()
    header = [_FORMAT, kind.value, run, server_round, policy, layout.digest]
    digest.update(json.dumps(header).encode())
    for name in layout.names:
        digest.update(name.encode() + b"\0")
        digest.update(np.ascontiguousarray(global_state[name], dtype=np.float32).data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Release:
    """An answer as it left: its round, metrics and (training) packed delta."""

    server_round: int
    metrics: dict[str, float | int]
    packed: np.ndarray | None


class ReleaseStore:
    """The latest answer per run and kind, under ``<ledger-dir>/releases``.

    Written before the answer leaves, atomically (a crash leaves the previous
    answer or none). A damaged or missing file only means the repeat is trained
    and counted like a new question: the store never sends anything that was not
    charged and counted as an answer before. Run keys are the site's own (hex).
    """

    def __init__(self, ledger_dir: Path) -> None:
        self.folder = Path(ledger_dir) / RELEASES_FOLDER

    def _paths(self, kind: AnswerKind, run: str) -> tuple[Path, Path]:
        if not _RUN_KEY.fullmatch(run):
            raise ValueError(f"not a site's run key: {run[:40]!r}")
        folder = self.folder / run
        return folder / f"{kind.value}.json", folder / f"{kind.value}.npy"

    def holds(self, kind: AnswerKind, run: str) -> bool:
        """Whether an answer of ``kind`` is kept for ``run``."""
        return self._paths(kind, run)[0].is_file()

    def find(
        self, kind: AnswerKind, run: str, digest: str, *, payload_size: int = 0
    ) -> Release | None:
        """The answer kept for exactly this question, or None."""
        meta_path, payload_path = self._paths(kind, run)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning(
                "kept answer %s unreadable (%s): answering anew", meta_path, error
            )
            return None
        if not isinstance(meta, dict) or meta.get("request") != digest:
            return None
        try:
            metrics = {str(k): v for k, v in dict(meta["metrics"]).items()}
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool)
                for v in metrics.values()
            ):
                raise ValueError("a metric is not a number")
            server_round = int(meta["round"])
            packed = None
            if kind is AnswerKind.TRAIN:
                packed = np.load(payload_path, allow_pickle=False)
                if packed.dtype != np.float32 or packed.shape != (payload_size,):
                    raise ValueError(
                        f"payload {packed.dtype} {packed.shape}, expected float32 "
                        f"({payload_size},)"
                    )
                if hashlib.sha256(packed.data).hexdigest() != meta["payload_sha256"]:
                    raise ValueError("payload checksum differs")
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "kept answer for %s round %s unusable (%s): answering anew",
                kind.value,
                meta.get("round"),
                error,
            )
            return None
        return Release(server_round, metrics, packed)

    def claim_replay(self, kind: AnswerKind, run: str, digest: str) -> int:
        """Count one more sending of the kept answer to ``digest``; its number.

        Checked and written under one lock, before the answer leaves: two repeats
        racing for the last sending cannot both get it, and a crash after this
        costs a sending, never adds one. Raises AnswerRefused past
        :data:`MAX_REPLAYS`, or when the answer cannot be counted.
        """
        meta_path, _ = self._paths(kind, run)
        lock = os.open(meta_path.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            meta = json.loads(meta_path.read_text())
            if meta.get("request") != digest:
                raise ValueError("the kept answer was replaced meanwhile")
            sent = int(meta.get("replays", 0))
            if sent >= MAX_REPLAYS:
                raise AnswerRefused(
                    f"this site has sent its round {meta.get('round')} {kind.value} "
                    f"answer again {sent} times, the most it sends one answer",
                    hint="A coordinator that restarts this often within one round "
                    "needs fixing; the rounds left are a new run for the sites to "
                    "approve.",
                )
            meta["replays"] = sent + 1
            _write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
            return sent + 1
        except (OSError, ValueError) as error:
            raise AnswerRefused(
                f"this site could not count a repeat of its {kind.value} answer "
                f"({type(error).__name__}); it does not send it",
                hint="Check free space and permissions of the privacy ledger's "
                "folder (releases/).",
            ) from error
        finally:
            os.close(lock)

    def keep(
        self,
        kind: AnswerKind,
        run: str,
        server_round: int,
        digest: str,
        metrics: Mapping[str, float | int],
        packed: np.ndarray | None = None,
    ) -> None:
        """Keep this answer for ``run`` (replacing the one before), durably."""
        meta_path, payload_path = self._paths(kind, run)
        self.folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.mkdir(exist_ok=True, mode=0o700)
        meta_path.parent.mkdir(exist_ok=True, mode=0o700)
        for left in meta_path.parent.glob(f"{kind.value}.*.partial"):
            left.unlink(missing_ok=True)  # a write a crash cut short
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "kind": kind.value,
            "round": server_round,
            "request": digest,
            "metrics": dict(metrics),
        }
        # The old description goes first: a crash between the two files then
        # leaves no description that points at the wrong payload.
        meta_path.unlink(missing_ok=True)
        if packed is not None:
            vector = np.ascontiguousarray(packed, dtype=np.float32)
            meta["payload_sha256"] = hashlib.sha256(vector.data).hexdigest()
            _write_atomically(payload_path, lambda f: np.save(f, vector))
        _write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        self._prune(keep=run)

    def _prune(self, keep: str) -> None:
        runs = [p for p in self.folder.iterdir() if p.is_dir()]
        runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in runs if p.name != keep][KEPT_RUNS - 1 :]:
            shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(
        prefix=f"{path.stem}.", suffix=".partial", dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def note_replayed(server_round: int) -> None:
    """Mark the answer being built in this thread as a replay (for audit and logs)."""
    _replayed.set(server_round)


def clear_replayed() -> None:
    """Forget the mark before a new message is handled."""
    _replayed.set(None)


def replayed_round() -> int | None:
    """The round of the replayed answer handled last in this thread, if it was one."""
    return _replayed.get()
