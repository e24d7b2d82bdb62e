"""Typed records of a run: what each site reported, what each round produced."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def _float(value: Any) -> float:
    """A float read back from JSON, where the run directory writes NaN as null."""
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class PrivacySpend:
    """A site's differential-privacy accounting after a round (its ledger's numbers)."""

    epsilon_run: float
    """Epsilon this run has spent at the site (the run's accountant, RDP by default)."""
    epsilon_run_prv: float
    """The same from the PRV accountant (the RDP bound where PRV cannot evaluate it)."""
    epsilon_total: float
    """Epsilon over every run in the site's ledger for this base model."""
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    epsilon_budget: float | None = None
    """The site's lifetime budget that ``epsilon_total`` counts against (None from a
    site that did not say)."""


@dataclass(frozen=True)
class SiteTrainReport:
    """One site's training reply in one round."""

    node_id: int
    site: str
    num_examples: int
    loss: float
    steps: int
    seconds: float
    delta_l2: float
    bytes_sent: int
    delta_clipped: bool = False
    privacy: PrivacySpend | None = None
    software_version: str | None = None
    """The wardround release the site runs, as it reported it."""


@dataclass(frozen=True)
class SiteEvalReport:
    """One site's evaluation of the global adapter in one round."""

    node_id: int
    site: str
    num_examples: int
    loss: float
    auroc_macro: float
    auroc_per_label: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    """Generative scores under their wire names (vlm family: perplexity, ...)."""
    software_version: str | None = None
    """The wardround release the site runs, as it reported it."""
    seconds: float | None = None
    """The site's evaluation time, as it reported it (None where it kept it home)."""


@dataclass(frozen=True)
class SiteFailure:
    """A site that did not reply usefully, and why (its own words are not shown)."""

    node_id: int
    phase: str
    reason: str
    kind: str | None = None
    """The site's error class when it said (e.g. PrivacyBudgetExhausted)."""
    went_away: bool = False
    """The site went away (no reply, offline, its reply cut off): asked again once
    it is back, it may answer."""


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round produced; one line of ``rounds.jsonl``."""

    round: int
    train: list[SiteTrainReport]
    evaluate: list[SiteEvalReport]
    failures: list[SiteFailure]
    global_auroc: float
    global_loss: float
    train_loss: float
    adapter_sha256: str
    seconds: float
    aggregation_seconds: float
    aggregation: str = "plain"
    """'plain' or 'secagg+' (see common.wire.Aggregation)."""
    secure_aggregation: dict[str, Any] | None = None
    """SecAgg+ settings and the stated quantization error bound of the round."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record a :meth:`to_json` dict (or a line of ``rounds.jsonl``) describes.

        Parameters
        ----------
        data
            ``record.to_json()``, or that dict after a trip through JSON: NaN
            metrics written as ``null`` come back as NaN.

        Returns
        -------
        RoundRecord
            ``RoundRecord.from_json(r.to_json()) == r`` for any record without NaN
            metrics (NaN never equals itself); after a JSON trip, tuples inside
            ``secure_aggregation`` and ``extra`` come back as lists.
        """
        return cls(
            round=int(data["round"]),
            train=[_train_report(t) for t in data["train"]],
            evaluate=[_eval_report(e) for e in data["evaluate"]],
            failures=[SiteFailure(**f) for f in data["failures"]],
            global_auroc=_float(data["global_auroc"]),
            global_loss=_float(data["global_loss"]),
            train_loss=_float(data["train_loss"]),
            adapter_sha256=str(data["adapter_sha256"]),
            seconds=_float(data["seconds"]),
            aggregation_seconds=_float(data["aggregation_seconds"]),
            aggregation=str(data.get("aggregation", "plain")),
            secure_aggregation=(
                None
                if data.get("secure_aggregation") is None
                else dict(data["secure_aggregation"])
            ),
            extra=dict(data.get("extra") or {}),
        )


def _train_report(data: Mapping[str, Any]) -> SiteTrainReport:
    privacy = data.get("privacy")
    return SiteTrainReport(
        node_id=int(data["node_id"]),
        site=str(data["site"]),
        num_examples=int(data["num_examples"]),
        loss=_float(data["loss"]),
        steps=int(data["steps"]),
        seconds=_float(data["seconds"]),
        delta_l2=_float(data["delta_l2"]),
        bytes_sent=int(data["bytes_sent"]),
        delta_clipped=bool(data.get("delta_clipped", False)),
        privacy=None if privacy is None else _privacy(privacy),
        software_version=_optional_text(data.get("software_version")),
    )


def _privacy(data: Mapping[str, Any]) -> PrivacySpend:
    return PrivacySpend(
        epsilon_run=_float(data["epsilon_run"]),
        epsilon_run_prv=_float(data["epsilon_run_prv"]),
        epsilon_total=_float(data["epsilon_total"]),
        delta=_float(data["delta"]),
        noise_multiplier=_float(data["noise_multiplier"]),
        sample_rate=_float(data["sample_rate"]),
        steps=int(data["steps"]),
        max_grad_norm=_float(data["max_grad_norm"]),
        epsilon_budget=(
            None
            if data.get("epsilon_budget") is None
            else float(data["epsilon_budget"])
        ),
    )


def _eval_report(data: Mapping[str, Any]) -> SiteEvalReport:
    return SiteEvalReport(
        node_id=int(data["node_id"]),
        site=str(data["site"]),
        num_examples=int(data["num_examples"]),
        loss=_float(data["loss"]),
        auroc_macro=_float(data["auroc_macro"]),
        auroc_per_label={k: _float(v) for k, v in data["auroc_per_label"].items()},
        metrics={k: _float(v) for k, v in (data.get("metrics") or {}).items()},
        software_version=_optional_text(data.get("software_version")),
        seconds=None if data.get("seconds") is None else float(data["seconds"]),
    )


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)
