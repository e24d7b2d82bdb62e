"""Typed records of a run: what each site reported, what each round produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    kind: str | None = None
    """The site's error class when it said (e.g. PrivacyBudgetExhausted)."""


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
