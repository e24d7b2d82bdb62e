"""Sigma planning, remembered on disk and shared by the sites of one machine.

Planning sigma is a binary search over Opacus's accountant: 0.01–13 s with RDP and
up to 86 s with PRV (``common/privacy.py``), paid by every site of a simulation in
its own worker process. The answer is pure in (target epsilon, delta, sample rate,
steps, accountant), so it is kept in the machine's cache
(:func:`~wardround.ops.cache_dir.cache_root`, ``sigma/``), one small JSON file per
question. Sites that ask the same question at once wait for the first to answer
(an exclusive ``flock`` per question) instead of all searching.

A remembered sigma is never trusted: before it is used, the accountant checks that
it spends at most the target over the planned steps (one accountant evaluation, not
a search). A file that is damaged, or that anyone with write access to the cache
edited to a smaller sigma, is planned again and rewritten; the worst a wrong file
can do is cost that time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common.config import Accountant
from ..common.privacy import (
    PRV_MAX_EPSILON,
    Mechanism,
    epsilon_spent,
    plan_noise_multiplier,
)

log = logging.getLogger(__name__)

FORMAT = 1
"""The cache file's format: a new one never reads an old one's files."""


def planned_sigma(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: Accountant,
    cache_dir: Path | None,
) -> float:
    """:func:`~wardround.common.privacy.plan_noise_multiplier`, remembered in ``cache_dir``.

    ``cache_dir`` None plans without the cache. A cache that cannot be read or
    written is logged and planned around, never an error.
    """

    def plan() -> float:
        return plan_noise_multiplier(
            target_epsilon, target_delta, sample_rate, total_steps, accountant
        )

    if cache_dir is None:
        return plan()
    question = {
        "format": FORMAT,
        "target_epsilon": float(target_epsilon),
        "target_delta": float(target_delta),
        "sample_rate": float(sample_rate),
        "total_steps": int(total_steps),
        "accountant": Accountant(accountant).value,
    }
    path = Path(cache_dir) / f"{_digest(question)}.json"
    try:
        with _locked(path.with_suffix(".lock")):
            sigma = _remembered(path, question)
            if sigma is None:
                sigma = plan()
                _remember(path, question, sigma)
            return sigma
    except OSError as err:
        log.warning("sigma cache %s not usable (%s); planning without it", path, err)
        return plan()


def _digest(question: dict[str, Any]) -> str:
    text = json.dumps(question, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remembered(path: Path, question: dict[str, Any]) -> float | None:
    """The sigma in ``path`` if it answers ``question`` and meets its target."""
    try:
        entry = json.loads(path.read_text())
        sigma = float(entry["sigma"])
        asked = entry["question"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("sigma cache file %s is damaged; planning again", path)
        return None
    if asked != question or not math.isfinite(sigma) or sigma <= 0:
        log.warning("sigma cache file %s does not answer this question", path)
        return None
    if not _meets_target(sigma, question):
        log.warning(
            "sigma cache file %s holds sigma %g, which spends more than epsilon %g: "
            "planning again",
            path,
            sigma,
            question["target_epsilon"],
        )
        return None
    return sigma


def _meets_target(sigma: float, question: dict[str, Any]) -> bool:
    """Whether ``sigma`` spends at most the target over the planned steps.

    Checked with the accountant the planner searched with (RDP for PRV targets
    above ``PRV_MAX_EPSILON``, as :func:`plan_noise_multiplier` does).
    """
    accountant = Accountant(question["accountant"])
    if accountant is Accountant.PRV and question["target_epsilon"] > PRV_MAX_EPSILON:
        accountant = Accountant.RDP
    mechanism = Mechanism(
        noise_multiplier=sigma,
        sample_rate=question["sample_rate"],
        steps=question["total_steps"],
    )
    spent = epsilon_spent([mechanism], question["target_delta"], accountant)
    return spent <= question["target_epsilon"]


def _remember(path: Path, question: dict[str, Any], sigma: float) -> None:
    """Write the answer atomically: a reader sees the old file or the new, whole."""
    text = json.dumps({"question": question, "sigma": sigma}, sort_keys=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
        raise
