"""Sigma planning, remembered on disk and shared by the sites of one machine.

Planning sigma is a binary search over Opacus's accountant: 0.01–13 s with RDP and
up to 86 s with PRV (``common/privacy.py``), paid by every site of a simulation in
its own worker process. The answer is pure in (target epsilon, delta, sample rate,
steps, accountant), so it is kept in the machine's cache
(:func:`~wardround.ops.cache_dir.cache_root`, ``sigma/``), one small JSON file per
question. Sites that ask the same question at once wait for the first to answer
(an exclusive ``flock`` per question) instead of all searching.

A remembered sigma is never trusted: before it is used, the accountant checks that
it spends the target over the planned steps, at most and within the search's
tolerance of it (one accountant evaluation, not a search). A sigma too small would
spend more privacy than agreed; one too large would drown the site's update in
noise. A file that is damaged, that is not a plain small file, or that anyone with
write access to the cache edited, is planned again and rewritten; the worst a wrong
file can do is cost that time. A lock held too long is waited for at most
``LOCK_WAIT_S``, then the site plans without the cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from ..common.config import Accountant
from ..common.privacy import (
    PRV_MAX_EPSILON,
    Mechanism,
    epsilon_spent,
    plan_noise_multiplier,
)
from ..ops.file_lock import exclusive_lock

log = logging.getLogger(__name__)

FORMAT = 1
"""The cache file's format: a new one never reads an old one's files."""
TIGHTNESS = 0.05
"""A remembered sigma must spend at least ``target - TIGHTNESS``: Opacus's search
stops within 0.01 below the target, so anything looser was not its answer."""
LOCK_WAIT_S = 300.0
"""How long a site waits for another's search (the slowest, PRV at epsilon 100,
took 86 s) before it plans without the cache."""
_MAX_FILE_BYTES = 4096


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
        with exclusive_lock(path.with_suffix(".lock"), LOCK_WAIT_S):
            sigma = _remembered(path, question)
            if sigma is None:
                sigma = plan()
                _remember(path, question, sigma)
            return sigma
    except (OSError, TimeoutError) as err:
        log.warning("sigma cache %s not usable (%s); planning without it", path, err)
        return plan()


def _digest(question: dict[str, Any]) -> str:
    text = json.dumps(question, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_small_file(path: Path) -> str:
    """The text of ``path`` if it is a plain file of at most a few KiB.

    Never follows a link and never blocks on a FIFO or device someone put there.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE_BYTES:
            raise ValueError("not a plain file of a few KiB")
        return os.read(fd, _MAX_FILE_BYTES).decode()
    finally:
        os.close(fd)


def _remembered(path: Path, question: dict[str, Any]) -> float | None:
    """The sigma in ``path`` if it answers ``question`` and meets its target."""
    try:
        entry = json.loads(_read_small_file(path))
        sigma = float(entry["sigma"])
        asked = entry["question"]
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno != errno.ELOOP:  # ELOOP: a link where the file should be
            raise
        log.warning("sigma cache file %s is a link; planning again", path)
        return None
    except (ValueError, KeyError, TypeError):
        log.warning("sigma cache file %s is damaged; planning again", path)
        return None
    if asked != question or not math.isfinite(sigma) or sigma <= 0:
        log.warning("sigma cache file %s does not answer this question", path)
        return None
    try:
        spent = _spent(sigma, question)
    except Exception:  # an absurd sigma can break the accountant itself
        log.warning("sigma cache file %s holds an unusable sigma; planning again", path)
        return None
    target = question["target_epsilon"]
    if not target - TIGHTNESS <= spent <= target:
        log.warning(
            "sigma cache file %s holds sigma %g, which spends epsilon %g where the "
            "plan needs %g (at most, within %g): planning again",
            path,
            sigma,
            spent,
            target,
            TIGHTNESS,
        )
        return None
    return sigma


def _spent(sigma: float, question: dict[str, Any]) -> float:
    """Epsilon ``sigma`` spends over the planned steps.

    Computed with the accountant the planner searched with (RDP for PRV targets
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
    return epsilon_spent([mechanism], question["target_delta"], accountant)


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
