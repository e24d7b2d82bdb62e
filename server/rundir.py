"""The run directory (DESIGN.md): run.json, rounds.jsonl, adapter/, checkpoints/, manifests/, plots/.

Also ``run-state.json`` (the run's id and config hash, to resume it) and
``status.json`` (what the run is doing now, for ``wardround launch``). Writes are
atomic (temp file + rename) so a crash never leaves a half-written file; only
``rounds.jsonl`` is appended to, and a torn last line is ignored when resuming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..common.adapter import adapter_sha256
from ..common.config import RunConfig
from ..common.errors import ConfigError
from ..ops.config_file import load_run_config
from .records import RoundRecord

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.jsonl"
STATUS_FILE = "status.json"
RUN_STATE_FILE = "run-state.json"
CONFIG_FILE = "run-config.toml"
EARLIER_RUNS_DIR = "earlier-runs"
RUN_OUTPUTS = (
    "run.json",
    ROUNDS_FILE,
    RUN_STATE_FILE,
    CONFIG_FILE,
    "adapter",
    "checkpoints",
    "manifests",
    "plots",
)
"""What a run writes into its directory and a new run there would overwrite."""


class RunState(StrEnum):
    """The ``state`` of ``status.json``."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


def _clean(value: Any) -> Any:
    """Make floats JSON-safe (NaN/inf → null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """Versions of the code and the stack, for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "wardround",
        "flwr",
        "torch",
        "transformers",
        "peft",
        "opacus",
        "pydicom",
        "pyarrow",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _config_sections(config: RunConfig) -> dict[str, str]:
    """sha256 of each config section but ``output`` (where and how outputs go)."""
    dumped = config.model_dump(mode="json", by_alias=True)
    dumped.pop("output")
    return {
        name: hashlib.sha256(
            json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        for name, value in sorted(dumped.items())
    }


def config_sha256(config: RunConfig) -> str:
    """A hash of the run config without its ``output`` section.

    Two configs with the same hash train the same run; ``output`` only says where
    the outputs go and whether to resume, so it may change between a run's start
    and its resumption.
    """
    sections = _config_sections(config)
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResumePoint:
    """The last round of a run directory that can be continued from."""

    round: int
    state: dict[str, np.ndarray]
    """The global adapter after that round (its checkpoint, hash-checked)."""
    records: list[RoundRecord]
    """Rounds 0 .. ``round`` as ``rounds.jsonl`` holds them."""
    lines: list[str]
    """Their lines of ``rounds.jsonl``, unchanged."""


@dataclass(frozen=True)
class RunStart:
    """Who the run is and where it starts (see :meth:`RunDirectory.open_run`)."""

    run_id: str
    started: float
    """When the run first started (epoch seconds), also when resumed."""
    resumed_from: list[int] = field(default_factory=list)
    """Every round the run was resumed from, oldest first."""
    point: ResumePoint | None = None
    """Where this call resumes from; None: from round 0."""


def _read_rounds(path: Path) -> list[tuple[str, RoundRecord]]:
    """The lines of ``rounds.jsonl`` that hold rounds 0, 1, 2, ... in order.

    Reading stops at the first line that does not parse (a crash mid-append tears
    only the last line) or that breaks the sequence.
    """
    if not path.is_file():
        return []
    kept: list[tuple[str, RoundRecord]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = RoundRecord.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError):
            log.warning(
                "%s: line %d is not a round record; reading stops", path, number
            )
            break
        if record.round != len(kept):
            log.warning(
                "%s: line %d holds round %d where %d was expected; reading stops",
                path,
                number,
                record.round,
                len(kept),
            )
            break
        kept.append((line, record))
    return kept


def _checkpoint_path(root: Path, server_round: int) -> Path:
    return root / "checkpoints" / f"round-{server_round:03d}" / "adapter.safetensors"


def load_checkpoint(
    path: Path, sha256: str, template: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """The adapter saved at ``path`` if it is intact, else None (and a warning).

    Parameters
    ----------
    path
        A checkpoint written by :meth:`RunDirectory.write_checkpoint`.
    sha256
        The adapter hash the round recorded in ``rounds.jsonl``; the tensors must
        hash to it (:func:`~wardround.common.adapter.adapter_sha256`), so a flipped
        byte anywhere is caught.
    template
        The model's adapter: the checkpoint must hold exactly its tensors and
        shapes; the result is in its key order.
    """
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # a damaged file fails in the parser's own ways
        log.warning("checkpoint %s cannot be read (%s); skipped", path, exc)
        return None
    problem = None
    if set(tensors) != set(template) or any(
        tuple(tensors[k].shape) != tuple(v.shape) for k, v in template.items()
    ):
        problem = "its tensors do not fit this run's model"
    elif metadata.get("sha256") != sha256 or adapter_sha256(tensors) != sha256:
        problem = "its adapter does not match the hash the round recorded"
    if problem is not None:
        log.warning("checkpoint %s is not usable: %s; skipped", path, problem)
        return None
    return OrderedDict((k, np.asarray(tensors[k], dtype=np.float32)) for k in template)


def find_resume_point(
    root: Path, template: Mapping[str, np.ndarray]
) -> ResumePoint | None:
    """The last round of ``root`` with a line in rounds.jsonl and an intact checkpoint.

    Returns None when there is none (no round past 0 checkpointed, or every
    checkpoint damaged).
    """
    rounds = _read_rounds(Path(root) / ROUNDS_FILE)
    for line_index in range(len(rounds) - 1, 0, -1):
        record = rounds[line_index][1]
        state = load_checkpoint(
            _checkpoint_path(Path(root), record.round), record.adapter_sha256, template
        )
        if state is not None:
            kept = rounds[: line_index + 1]
            return ResumePoint(
                round=record.round,
                state=state,
                records=[r for _, r in kept],
                lines=[line for line, _ in kept],
            )
    return None


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """Entries ``<prefix>NNN[.json]`` of ``folder`` with their round numbers."""
    found = []
    for entry in folder.glob(f"{prefix}*") if folder.is_dir() else []:
        digits = entry.name[len(prefix) :].split(".")[0]
        if digits.isdigit():
            found.append((int(digits), entry))
    return found


class RunDirectory:
    """Writes one run's outputs as rounds complete."""

    def __init__(self, root: Path, config: RunConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.root.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.root / ROUNDS_FILE
        self.started = time.time()

    # -- starting and resuming -------------------------------------------------
    def open_run(
        self, template: Mapping[str, np.ndarray], run_id: str | None = None
    ) -> RunStart:
        """Start the run here, or resume it when ``output.resume`` is set.

        Resuming keeps the run id, the rounds up to the last intact checkpoint and
        their manifests, and drops every later round. Without an intact checkpoint
        the run starts from round 0 under a new id. Writes ``run-state.json`` and
        the run config.

        Raises
        ------
        ConfigError
            ``output.resume`` is set and the config (but for ``output``) differs
            from the one the run in this directory started with.
        """
        prior = self.read_run_state()
        point = None
        if self.config.output.resume:
            self._check_same_config(prior)
            point = find_resume_point(self.root, template)
            if point is None:
                log.warning(
                    "output.resume is set but %s holds no intact checkpoint past "
                    "round 0: the run starts from round 0",
                    self.root,
                )
        if point is None:
            self._set_aside_earlier_run(prior)
            start = RunStart(run_id or uuid.uuid4().hex, time.time())
        else:
            start = self._resume(point, prior or {}, run_id)
        self._write_run_state(start)
        self.write_config()
        return start

    def _set_aside_earlier_run(self, prior: Mapping[str, Any] | None) -> Path | None:
        """Move an earlier run's outputs into ``earlier-runs/`` instead of losing them.

        A second ``wardround simulate`` into the same ``--out`` starts a new run
        there; the first run's rounds, checkpoints and summary stay readable. The
        launcher's own files (``launch.json``, ``status.json``) stay in place: they
        belong to the run being started.
        """
        found = [
            self.root / name for name in RUN_OUTPUTS if (self.root / name).exists()
        ]
        if not found:
            return None
        earlier = (prior or {}).get("run_id") or self._run_json_field("run_id")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.root / EARLIER_RUNS_DIR / f"{stamp}-{earlier or 'run'}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = target.with_name(f"{stamp}-{earlier or 'run'}-{suffix}")
        target.mkdir(parents=True)
        for path in found:
            os.replace(path, target / path.name)
        log.warning(
            "%s held an earlier run's outputs; they are now in %s",
            self.root,
            target,
        )
        return target

    def _resume(
        self, point: ResumePoint, prior: Mapping[str, Any], run_id: str | None
    ) -> RunStart:
        previous_id = prior.get("run_id") or self._run_json_field("run_id")
        if previous_id is None:
            # A directory from before run-state.json, crashed before run.json.
            previous_id = run_id or uuid.uuid4().hex
            log.warning("the run's id is not recorded; it continues as %s", previous_id)
        elif run_id is not None and run_id != previous_id:
            log.warning(
                "resuming run %s: the run id %s is not used", previous_id, run_id
            )
        self.truncate_to(point)
        log.info("resuming run %s from round %d", previous_id, point.round)
        return RunStart(
            run_id=str(previous_id),
            started=float(prior.get("started", time.time())),
            resumed_from=[*prior.get("resumed_from", []), point.round],
            point=point,
        )

    def _check_same_config(self, prior: Mapping[str, Any] | None) -> None:
        recorded = (prior or {}).get("config_sections")
        if recorded is None and (self.root / CONFIG_FILE).is_file():
            # A run from before run-state.json: its saved config says the same.
            recorded = _config_sections(load_run_config(self.root / CONFIG_FILE))
        if recorded is None:
            return  # nothing ran here: nothing to differ from
        now = _config_sections(self.config)
        changed = sorted(
            k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k)
        )
        if not changed:
            return
        raise ConfigError(
            f"output.resume is set, but the run in {self.root} started with another "
            f"config: section(s) {', '.join(changed)} differ (only [output] may "
            "change when a run resumes)",
            hint=f"Resume with the run's own config ({self.root / CONFIG_FILE} holds "
            "it, with output.resume = true), or start a new run: output.resume = "
            "false, or another output.dir.",
        )

    def truncate_to(self, point: ResumePoint) -> None:
        """Drop every round after ``point``: its lines, manifests and checkpoints."""
        tmp = self.rounds_path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as handle:
            handle.write("".join(line + "\n" for line in point.lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.rounds_path)
        for number, path in _numbered(self.root / "manifests", "round-"):
            if number > point.round:
                path.unlink()
        for number, path in _numbered(self.root / "checkpoints", "round-"):
            if number > point.round:
                shutil.rmtree(path)

    def read_run_state(self) -> dict[str, Any] | None:
        """``run-state.json`` as written at the run's start, or None."""
        path = self.root / RUN_STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _write_run_state(self, start: RunStart) -> None:
        write_json(
            self.root / RUN_STATE_FILE,
            {
                "run_id": start.run_id,
                "config_sha256": config_sha256(self.config),
                "config_sections": _config_sections(self.config),
                "started_at": datetime.fromtimestamp(start.started, UTC).isoformat(),
                "started": start.started,
                "resumed_from": start.resumed_from,
            },
        )

    def _run_json_field(self, key: str) -> Any:
        try:
            return json.loads((self.root / "run.json").read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    # -- while the run goes ----------------------------------------------------
    def write_status(
        self,
        state: RunState,
        *,
        server_round: int,
        run_id: str | None,
        reason: str | None = None,
    ) -> None:
        """Write ``status.json``: what the run is doing now (``wardround launch`` reads it)."""
        write_json(
            self.root / STATUS_FILE,
            {
                "state": RunState(state).value,
                "round": server_round,
                "rounds": self.config.federation.rounds,
                "reason": reason,
                "updated": _now_iso(),
                "run_id": run_id,
            },
        )

    def write_round(self, record: RoundRecord, manifest: Mapping[str, Any]) -> None:
        """Append the round to rounds.jsonl and write its manifest."""
        with self.rounds_path.open("a") as handle:
            handle.write(json.dumps(_clean(record.to_json())) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        write_json(self.root / "manifests" / f"round-{record.round:03d}.json", manifest)

    def write_checkpoint(
        self, server_round: int, state: Mapping[str, np.ndarray], sha256: str
    ) -> Path:
        """Save the global adapter after a round (safetensors, no pickle)."""
        from safetensors.numpy import save_file

        folder = self.root / "checkpoints" / f"round-{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
            str(folder / "adapter.safetensors"),
            metadata={
                "round": str(server_round),
                "sha256": sha256,
                "payload": "weights",
            },
        )
        return folder

    def write_final(self, summary: Mapping[str, Any]) -> None:
        """Write run.json."""
        write_json(self.root / "run.json", summary)

    def write_config(self) -> Path:
        """Save the run config as TOML next to the outputs (to rebuild the base model)."""
        import tomli_w

        path = self.root / "run-config.toml"
        path.write_text(
            tomli_w.dumps(self.config.model_dump(mode="json", by_alias=True))
        )
        return path
