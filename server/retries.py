"""When a round that fell short of min-sites is asked again.

A site that goes away mid-round (stopped, restarted, its network down) used to
stop a deployed run. A round it left short is asked again once enough sites are
connected, at most ``federation.round-retries`` times per phase. A deployed site
that had answered sends its kept answer again (in the clear: no new epsilon, not
counted; see :mod:`wardround.client.replay`), and a site that had not answered
answers for the first time. A site that died while training had already counted
the round (and under DP reserved its epsilon): it answers it again as a new
answer. A masked (SecAgg+) answer is never sent again, so under SecAgg+ a
training round is asked again only within ``federation.repeatable-rounds``: the
repeats the sites planned their noise and answers for.

Only a deployment asks again: in a simulation no site goes away, and a site that
timed out is still working on the round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.config import RunConfig
from .phases import sites_went_away
from .records import RoundRecord, SiteFailure

log = logging.getLogger(__name__)


@dataclass
class RoundRetries:
    """The run's rule for asking a short round again, and what it has asked."""

    config: RunConfig
    enabled: bool = True
    """False in a simulation (see the module's docstring)."""
    secure_repeats_used: int = 0
    """Training rounds asked again under SecAgg+: each uses one of every site's
    ``repeatable-rounds``."""
    asked_again: list[dict[str, Any]] = field(default_factory=list)
    """This round's repeats: the phase and the failures of the ask before."""

    @classmethod
    def resuming(
        cls, config: RunConfig, records: Sequence[RoundRecord], *, enabled: bool
    ) -> RoundRetries:
        """The rule for a run that goes on after ``records`` (a resumed run's).

        Under SecAgg+ the repeats already asked count, and so does the round a
        resumed run asks again (its sites may have answered it before the restart).
        """
        used = sum(
            1
            for record in records
            for again in record.extra.get("asked_again", ())
            if again.get("phase") == "train"
        )
        if records and config.secure_aggregation.enabled:
            used += 1
        return cls(config, enabled=enabled, secure_repeats_used=used)

    def start_round(self) -> None:
        """Forget the previous round's repeats (the record keeps them)."""
        self.asked_again = []

    def why_not(
        self, phase: str, failures: list[SiteFailure], answered: int, asked: int
    ) -> str | None:
        """None when the phase may be asked again; else why not ('' : not worth saying).

        ``answered``: the sites whose answers count; ``asked``: how many times the
        phase was asked.
        """
        if not self.enabled or not sites_went_away(failures):
            return ""
        gone = sum(f.went_away for f in failures)
        federation = self.config.federation
        if answered + gone < federation.min_sites:
            refused = len(failures) - gone
            return (
                f"{refused} site(s) refused or failed it, so even with every site "
                f"that went away back it cannot reach federation.min-sites="
                f"{federation.min_sites}"
            )
        if asked > federation.round_retries:
            return (
                f"asked {asked} time(s); federation.round-retries = "
                f"{federation.round_retries}"
            )
        if phase == "train" and self.config.secure_aggregation.enabled:
            if self.secure_repeats_used >= federation.repeatable_rounds:
                return (
                    "under SecAgg+ a masked answer is never sent again: a training "
                    "round is asked again only within federation.repeatable-rounds "
                    f"({federation.repeatable_rounds}"
                    + (", all used)" if federation.repeatable_rounds else ")")
                )
        return None

    def note(self, phase: str, failures: list[SiteFailure]) -> None:
        """Record that ``phase`` is asked again after these failures."""
        if phase == "train" and self.config.secure_aggregation.enabled:
            self.secure_repeats_used += 1
        self.asked_again.append(
            {"phase": phase, "failures": [asdict(f) for f in failures]}
        )
