"""The study's arithmetic (pure numpy): mean ± sd over seeds, subgroups, goals.

Nothing here reads files or trains: the runner hands in numbers, the report
renders what comes out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...client.metrics import auroc_per_label, macro_auroc
from ...common.config import TaskConfig

AGE_BANDS = ((0, 50, "<50"), (50, 65, "50–64"), (65, 80, "65–79"), (80, 200, "≥80"))
"""Age bands of the subgroup table: [low, high) years and their names."""
UNKNOWN = "unknown"
_GROUP_ORDER = ("all", "F", "M", *(name for _, _, name in AGE_BANDS), UNKNOWN)


def group_order(group: str) -> tuple[int, str]:
    """Sort key for subgroup names: sexes, then age bands in order, then sites."""
    if group in _GROUP_ORDER:
        return _GROUP_ORDER.index(group), ""
    return len(_GROUP_ORDER), group


@dataclass(frozen=True)
class MeanSd:
    """A mean over seeds with its sample standard deviation (NaN for one value)."""

    mean: float
    sd: float
    n: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def mean_sd(values: Iterable[float]) -> MeanSd:
    """Mean and sample sd (ddof 1) of the finite values; NaN where undefined."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return MeanSd(math.nan, math.nan, 0)
    mean = float(np.mean(finite))
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return MeanSd(mean, sd, len(finite))


def site_mean(aurocs: Mapping[str, float]) -> float:
    """The unweighted mean of the sites' macro AUROCs (every hospital counts once)."""
    values = [v for v in aurocs.values() if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """The quotient, NaN when undefined (a NaN or a zero denominator)."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or not denominator:
        return math.nan
    return numerator / denominator


# -- subgroups ------------------------------------------------------------------
def demographics(ehr: np.ndarray, task: TaskConfig) -> tuple[list[str], list[str]]:
    """Sex and age band of each row of encoded EHR vectors (the site dataset's layout).

    The layout is that of :mod:`wardround.sitedata.ehr`: normalised numeric
    values, one missingness flag per numeric feature, then per categorical feature
    a one-hot over its vocabulary plus an 'unknown' slot. Rows whose age is
    missing, or whose sex is outside the vocabulary, are 'unknown'.
    """
    numeric = list(task.numeric)
    n_numeric = len(numeric)
    ages: list[str] = [UNKNOWN] * len(ehr)
    if "age" in task.numeric:
        column = numeric.index("age")
        stats = task.numeric["age"]
        years = ehr[:, column] * stats.std + stats.mean
        missing = ehr[:, n_numeric + column] > 0.5
        ages = [
            UNKNOWN if m else age_band(y) for y, m in zip(years, missing, strict=True)
        ]
    sexes: list[str] = [UNKNOWN] * len(ehr)
    start = 2 * n_numeric
    for name, vocab in task.categorical.items():
        if name == "sex":
            block = ehr[:, start : start + len(vocab) + 1]
            sexes = [
                vocab[int(i)] if i < len(vocab) and row[i] > 0.5 else UNKNOWN
                for row, i in zip(block, block.argmax(axis=1), strict=True)
            ]
        start += len(vocab) + 1
    return sexes, ages


def age_band(years: float) -> str:
    """The :data:`AGE_BANDS` name of an age in years."""
    for low, high, name in AGE_BANDS:
        if low <= years < high:
            return name
    return UNKNOWN


def subgroup_auroc(
    labels: np.ndarray, scores: np.ndarray, groups: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Macro AUROC (over the labels with both classes in the group) per group.

    Returns group -> {"auroc": ..., "n": examples}; a group where no label has
    both classes gets AUROC NaN.
    """
    out: dict[str, dict[str, float]] = {}
    names = np.asarray(groups)
    for group in sorted(set(groups)):
        rows = names == group
        per_label = auroc_per_label(labels[rows], scores[rows])
        out[group] = {"auroc": macro_auroc(per_label), "n": int(rows.sum())}
    return out


# -- goals ----------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    """One of the issues' goals, checked against the measured figures."""

    key: str
    cell: str
    """The cell it was measured in (its key: patients x sites - base)."""
    patients: int
    sites: int
    base: str
    goal: str
    """The goal in words, with its threshold."""
    measured: str
    """The measured figure(s) in words."""
    value: float
    threshold: float | None
    met: bool | None
    """None: reported only (no threshold), or not measured."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def at_least(
    key: str,
    cell: Any,
    goal: str,
    measured: str,
    value: float,
    threshold: float | None,
) -> Goal:
    """A goal met when ``value >= threshold``, in ``cell`` (a :class:`~.plan.Cell`).

    ``met`` is None without a threshold, or when the value was not measured.
    """
    met = None
    if threshold is not None and math.isfinite(value):
        met = value >= threshold
    where = cell.as_dict()
    return Goal(
        key,
        cell.key,
        where["patients"],
        where["sites"],
        where["base"],
        goal,
        measured,
        value,
        threshold,
        met,
    )
