"""The site's privacy ledger: one append-only JSONL file per site.

The ledger belongs to the site's patients, not to a model or a run: every
application of the DP mechanism to this site's data, whatever the base model or
the run, is composed into one lifetime epsilon. A ``reserve`` line (σ, sample
rate, planned steps, run, round, time) is made durable *before* local training
starts, under the same lock as the budget check that admits it; a ``commit`` line
(steps taken) is written after training and *before* the update leaves the site.
A reservation without a commit (a crash mid-round) counts with its planned steps,
a committed one with the steps it took.

The ``run`` of a line is the site's own identity of the run (the settings it
approved, see :mod:`wardround.client.run_identity`), never an id a message names.

The file is a :mod:`wardround.ops.jsonl_log` hash chain: each line carries a
sha256 of its canonical JSON and repeats the seal of the line before it
(``prev``), so a torn, edited, deleted, inserted or reordered line is detected.
Only a torn *last* line is tolerated (a crash during the append: the reservation
never became durable, so training never started); any other damage stops the
site from training until an operator restores the file. Lines of version 1 (sealed
one by one, before the chain) are read as they are; the first version-2 line
chains on from the last of them.

Ledgers of earlier versions (one file per base model, ``<fingerprint>.jsonl``)
in the same folder are read and counted, never written.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..common.config import Accountant
from ..common.errors import DataError
from ..common.privacy import Mechanism, epsilon_spent
from ..ops.jsonl_log import (
    chain_prev,
    chain_problem,
    locked_for_append,
    parse_object,
    read_locked,
    sha256_seal,
)

log = logging.getLogger(__name__)

VERSION = 2
"""The version new lines are written in: 2 chains each line to the one before it."""
_UNCHAINED = 1
"""Lines sealed one by one (written before the chain); read, never written."""
_SEALS = ("sha256", "prev")
_RESTORE_HINT = (
    "This site must not train until an operator restores the ledger from a backup "
    "(or repairs the line after checking what it recorded). Do not delete it: it is "
    "the site's only record of the privacy its patients have already lost."
)
_NUMBER = (int, float)
_RESERVE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "run": (str,),
    "round": (int,),
    "time": _NUMBER,
    "noise_multiplier": _NUMBER,
    "sample_rate": _NUMBER,
    "steps": (int,),
    "delta": _NUMBER,
    "max_grad_norm": _NUMBER,
    "accountant": (str,),
    "base_model": (str,),
}
_COMMIT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "steps": (int,),
    "time": _NUMBER,
    "epsilon_run": (*_NUMBER, type(None)),
    "epsilon_total": (*_NUMBER, type(None)),
}


LEDGER_FILE = "ledger.jsonl"
_LEGACY_NAME = re.compile(r"[0-9a-f]{16}\.jsonl")

Admit = Callable[[list[tuple[str, Mechanism]]], None]
"""Called under the ledger's lock with every recorded (run, mechanism); raises to
refuse a reservation."""


def ledger_file(ledger_dir: Path) -> Path:
    """The site's ledger (its folder is created, 0o700)."""
    ledger_dir = Path(ledger_dir)
    ledger_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return ledger_dir / LEDGER_FILE


def legacy_ledgers(ledger_dir: Path) -> list[Path]:
    """Per-base-model ledgers an earlier version wrote in ``ledger_dir``."""
    folder = Path(ledger_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _LEGACY_NAME.fullmatch(p.name))


def site_ledger(ledger_dir: Path) -> PrivacyLedger:
    """The site's ledger, counting the earlier per-model ledgers beside it."""
    return PrivacyLedger(ledger_file(ledger_dir), legacy=legacy_ledgers(ledger_dir))


def _encode(body: Mapping[str, Any]) -> bytes:
    entry = {**body, "sha256": sha256_seal(body)}
    return (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode()


class PrivacyLedger:
    """Reads and appends one ledger file; safe across processes (``flock``)."""

    def __init__(self, path: Path, legacy: list[Path] | tuple[Path, ...] = ()) -> None:
        self.path = Path(path)
        self.legacy = tuple(Path(p) for p in legacy)

    # -- writing ----------------------------------------------------------------
    def reserve(
        self,
        run_id: str,
        server_round: int,
        mechanism: Mechanism,
        *,
        delta: float,
        max_grad_norm: float,
        accountant: Accountant | str,
        base_model: str,
        admit: Admit | None = None,
    ) -> str:
        """Durably record a round's planned mechanism before training; its id.

        ``admit`` sees the recorded history under the same lock as the append, so
        a budget check and its reservation are one step: two rounds racing for the
        last of a budget cannot both get it.
        """
        entry_id = uuid.uuid4().hex

        def check(entries: list[dict[str, Any]]) -> None:
            if admit is not None:
                admit([*self._legacy_mechanisms(), *_mechanisms_of(entries)])

        self._append(
            {
                "kind": "reserve",
                "v": VERSION,
                "id": entry_id,
                "run": str(run_id),
                "round": int(server_round),
                "time": time.time(),
                "noise_multiplier": float(mechanism.noise_multiplier),
                "sample_rate": float(mechanism.sample_rate),
                "steps": int(mechanism.steps),
                "delta": float(delta),
                "max_grad_norm": float(max_grad_norm),
                "accountant": Accountant(accountant).value,
                "base_model": str(base_model),
            },
            check=check,
            create=True,
        )
        return entry_id

    def commit(
        self,
        entry_id: str,
        steps_taken: int,
        *,
        epsilon_run: float,
        epsilon_total: float,
    ) -> None:
        """Durably record the steps a reserved round took, before its update leaves.

        The epsilons are informational (the history is what counts); a non-finite
        one is stored as null.
        """
        if steps_taken < 0:
            raise ValueError(f"steps taken must be >= 0, got {steps_taken}")

        def check(entries: list[dict[str, Any]]) -> None:
            reserved = [e for e in entries if e["kind"] == "reserve"]
            match = [e for e in reserved if e["id"] == entry_id]
            if not match:
                raise DataError(
                    f"privacy ledger {self.path} has no reservation {entry_id} to "
                    "commit: the file was replaced or truncated while the site trained",
                    hint=_RESTORE_HINT,
                )
            if any(e["kind"] == "commit" and e["id"] == entry_id for e in entries):
                raise DataError(
                    f"reservation {entry_id} in privacy ledger {self.path} is "
                    "already committed"
                )
            if steps_taken > match[0]["steps"]:
                log.warning(
                    "round took %d DP-SGD steps, %d were planned and checked "
                    "against the budget",
                    steps_taken,
                    match[0]["steps"],
                )

        self._append(
            {
                "kind": "commit",
                "v": VERSION,
                "id": entry_id,
                "steps": int(steps_taken),
                "time": time.time(),
                "epsilon_run": _finite_or_none(epsilon_run),
                "epsilon_total": _finite_or_none(epsilon_total),
            },
            check=check,
        )

    def _append(
        self,
        body: dict[str, Any],
        check: Callable[[list[dict[str, Any]]], None] | None = None,
        *,
        create: bool = False,
    ) -> None:
        """Append one line under an exclusive lock, fsync'ed before returning.

        A torn tail left by an earlier crash is cut off first, so it cannot end up
        glued to this line in the middle of the file.
        """
        try:  # a reservation may start the file; a commit may not
            with locked_for_append(self.path, create=create) as ledger_file:
                raw = ledger_file.read_all()
                entries, torn_at = self._parse(raw)
                if check is not None:
                    check(entries)
                line = _encode(
                    {**body, "prev": chain_prev(entries[-1] if entries else None)}
                )
                # complete a last line that verified but lacks its newline
                partial = torn_at is None and bool(raw) and not raw.endswith(b"\n")
                ledger_file.append(line, cut_at=torn_at, after_partial=partial)
        except FileNotFoundError:
            raise DataError(
                f"privacy ledger {self.path} is missing: it was deleted or moved while "
                "the site trained",
                hint=_RESTORE_HINT,
            ) from None

    # -- reading ----------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every line in file order, without its seals (raises DataError on damage)."""
        return [
            {k: v for k, v in e.items() if k not in _SEALS} for e in self._read()[0]
        ]

    def history(self, run_id: str | None = None) -> list[Mechanism]:
        """The mechanisms that count, in order, for one run or (None) every run.

        A committed reservation counts the steps taken; an uncommitted one its
        planned steps (it may have trained until a crash).
        """
        return [m for run, m in self._mechanisms() if run_id is None or run == run_id]

    def epsilon(
        self, delta: float, accountant: Accountant, run_id: str | None = None
    ) -> float:
        """Epsilon spent by one run, or (None) by every run at this site."""
        return epsilon_spent(self.history(run_id), delta, accountant)

    def projected(
        self,
        mechanism: Mechanism,
        delta: float,
        accountant: Accountant,
        run_id: str | None,
        *,
        lifetime_delta: float | None = None,
        lifetime_accountant: Accountant | None = None,
    ) -> tuple[float, float]:
        """(run epsilon, lifetime epsilon) if ``mechanism`` were applied now.

        ``run_id=None`` stands for a run with no round yet: its epsilon is that of
        ``mechanism`` alone. The lifetime epsilon is at ``lifetime_delta`` (the
        site's own, default ``delta``).
        """
        return project(
            self._mechanisms(),
            mechanism,
            run_id,
            run_delta=delta,
            lifetime_delta=delta if lifetime_delta is None else lifetime_delta,
            accountant=accountant,
            lifetime_accountant=lifetime_accountant,
        )

    def recorded(self) -> list[tuple[str, Mechanism]]:
        """(run, mechanism) of every round that counts, earlier ledgers first."""
        return self._mechanisms()

    def _mechanisms(self) -> list[tuple[str, Mechanism]]:
        return [*self._legacy_mechanisms(), *_mechanisms_of(self._read()[0])]

    def _legacy_mechanisms(self) -> list[tuple[str, Mechanism]]:
        recorded: list[tuple[str, Mechanism]] = []
        for path in self.legacy:
            recorded.extend(_mechanisms_of(PrivacyLedger(path)._read()[0]))
        return recorded

    def _read(self) -> tuple[list[dict[str, Any]], int | None]:
        try:
            raw = read_locked(self.path)
        except FileNotFoundError:
            return [], None
        return self._parse(raw)

    def _parse(self, raw: bytes) -> tuple[list[dict[str, Any]], int | None]:
        """Checked entries, and the offset of a torn last line (None if there is none).

        A last line without its newline that still verifies is kept (counting it
        is the safe side); one that does not is a torn append and is ignored.
        """
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        entries: list[dict[str, Any]] = []
        seen: dict[str, list[str]] = {}  # id -> kinds of its lines so far
        for number, line in enumerate(lines, start=1):
            entry, problem = _decode(line)
            if problem is None:
                problem = _check_entry(entry, seen) or _link_problem(entry, entries)
            if problem is not None:
                raise DataError(
                    f"privacy ledger {self.path} is damaged at line {number}: "
                    f"{problem}",
                    hint=_RESTORE_HINT,
                )
            entries.append(entry)
            seen.setdefault(entry["id"], []).append(entry["kind"])
        torn_at = None
        if tail:
            entry, problem = _decode(tail)
            if problem is None:
                problem = _check_entry(entry, seen) or _link_problem(entry, entries)
            if problem is None:
                entries.append(entry)
                log.warning(
                    "privacy ledger %s: last line lacks its newline but verifies; kept",
                    self.path,
                )
            else:
                torn_at = len(raw) - len(tail)
                log.warning(
                    "privacy ledger %s ends in a partial line (%d bytes, a crash "
                    "while appending); ignored: that reservation never became "
                    "durable, so its round never trained",
                    self.path,
                    len(tail),
                )
        return entries, torn_at


def project(
    recorded: list[tuple[str, Mechanism]],
    mechanism: Mechanism,
    run_id: str | None,
    *,
    run_delta: float,
    lifetime_delta: float,
    accountant: Accountant,
    lifetime_accountant: Accountant | None = None,
) -> tuple[float, float]:
    """Run and lifetime epsilon of the recorded history with ``mechanism`` added.

    The run's at ``run_delta`` (its own rounds only), the lifetime's at
    ``lifetime_delta`` (every round at the site).
    """
    of_run = [m for run, m in recorded if run_id is not None and run == run_id]
    everything = [m for _, m in recorded]
    return (
        epsilon_spent([*of_run, mechanism], run_delta, accountant),
        epsilon_spent(
            [*everything, mechanism], lifetime_delta, lifetime_accountant or accountant
        ),
    )


def _mechanisms_of(entries: list[dict[str, Any]]) -> list[tuple[str, Mechanism]]:
    """(run, mechanism) of every reservation: the steps taken once committed."""
    taken = {e["id"]: e["steps"] for e in entries if e["kind"] == "commit"}
    return [
        (
            e["run"],
            Mechanism(
                noise_multiplier=float(e["noise_multiplier"]),
                sample_rate=float(e["sample_rate"]),
                steps=taken.get(e["id"], e["steps"]),
            ),
        )
        for e in entries
        if e["kind"] == "reserve"
    ]


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _decode(line: bytes) -> tuple[dict[str, Any], str | None]:
    entry, problem = parse_object(line)
    if entry is None:
        return {}, problem
    body = {k: v for k, v in entry.items() if k != "sha256"}
    if entry.get("sha256") != sha256_seal(body):
        return {}, "its sha256 does not match its content (edited or corrupted)"
    return entry, None


def _link_problem(entry: dict[str, Any], before: list[dict[str, Any]]) -> str | None:
    """Why ``entry`` does not follow the checked lines ``before`` it, or None.

    Version-1 lines are not chained: they may only come before the first chained
    line, which repeats the seal of the line before it (the genesis seal first).
    """
    chained_before = any(e["v"] != _UNCHAINED for e in before)
    if entry["v"] == _UNCHAINED:
        if chained_before:
            return "an unchained (version 1) line after the chain began"
        return None
    return chain_problem(entry, chain_prev(before[-1] if before else None))


def _check_entry(entry: dict[str, Any], seen: Mapping[str, list[str]]) -> str | None:
    """What is wrong with a checksummed entry, given the kinds of earlier lines by id."""
    kind = entry.get("kind")
    if kind not in ("reserve", "commit") or entry.get("v") not in (_UNCHAINED, VERSION):
        return (
            f"unknown entry kind {kind!r} / version {entry.get('v')!r}: if a newer "
            "wardround wrote it, upgrade this site's wardround; never replace the "
            "ledger with an older copy, which would forget privacy already spent"
        )
    fields = _RESERVE_FIELDS if kind == "reserve" else _COMMIT_FIELDS
    for name, types in fields.items():
        value = entry.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            return f"field {name!r} is missing or has the wrong type"
    if entry["steps"] < 0:
        return "negative steps"
    same_id = seen.get(entry["id"], [])
    if kind == "reserve":
        if same_id:
            return f"reservation id {entry['id']} appears twice"
        try:
            Mechanism(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
        except ValueError as err:
            return str(err)
        return None
    if "reserve" not in same_id:
        return f"commit of reservation {entry['id']}, which no earlier line makes"
    if "commit" in same_id:
        return f"reservation {entry['id']} is committed twice"
    return None
