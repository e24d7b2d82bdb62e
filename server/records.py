"""Typed records of a run: what each site reported, what each round produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class SiteEvalReport:
    """One site's evaluation of the global adapter in one round."""

    node_id: int
    site: str
    num_examples: int
    loss: float
    auroc_macro: float
    auroc_per_label: dict[str, float]


@dataclass(frozen=True)
class SiteFailure:
    """A site that did not reply usefully, and why (its own words are not shown)."""

    node_id: int
    phase: str
    reason: str


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)
