"""What the site's dashboard shows, read from the site's own files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...sitedata.site_config import SiteConfig
from .log_totals import TaskTotals, fold_refusal, fold_task, no_refusals
from .tally import JsonlTally

DEFAULT_DELTA = 1e-5


def privacy_report(site: SiteConfig, delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """The site's privacy ledger: ε per run and over every run (``site privacy --json``)."""
    from ...common.config import Accountant
    from ..ledger import site_ledger

    ledger = site_ledger(site.ledger_path)
    recorded = ledger.recorded()
    runs = sorted({run for run, _ in recorded})
    return {
        "delta": delta,
        "ledger": str(ledger.path),
        "earlier_ledgers": [str(p) for p in ledger.legacy],
        "rounds": len(recorded),
        "epsilon_total": ledger.epsilon(delta, Accountant.RDP),
        "budget_epsilon": site.privacy.budget_epsilon,
        "runs": {run: ledger.epsilon(delta, Accountant.RDP, run) for run in runs},
    }


def floor_rows(site: SiteConfig) -> list[tuple[str, str]]:
    """The site's privacy floor, as set in site.toml."""
    p = site.privacy
    return [
        ("DP-SGD required", "yes" if p.required else "no"),
        ("most ε one run may spend", f"{p.max_epsilon:g}"),
        ("lifetime budget ε", f"{p.budget_epsilon:g}"),
        (
            "largest δ",
            "1 / training patients" if p.max_delta is None else f"{p.max_delta:g}",
        ),
        ("lowest noise multiplier σ", f"{p.min_noise_multiplier:g}"),
        ("lifetime accountant", p.accountant.value),
    ]


@dataclass
class SiteSource:
    """The site's files: site.toml, ledger, approvals, audit and egress logs.

    ``check`` gives the ``site check`` report; the daemon passes the one it made at
    start, ``wardround dashboard --site`` makes one on first view.
    """

    site: SiteConfig
    check: Callable[[], dict[str, Any]]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _privacy: tuple[tuple[Any, ...], dict[str, Any]] | None = field(
        default=None, repr=False
    )
    _egress_tally: JsonlTally[TaskTotals] | None = field(default=None, repr=False)
    _refusal_tally: JsonlTally[dict[str, int]] | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        """The daemon's state folder."""
        return self.site.state_path

    @property
    def audit_path(self) -> Path:
        """The site's audit log."""
        from ..daemon import AUDIT_FILE

        return self.state_dir / AUDIT_FILE

    @property
    def egress_path(self) -> Path:
        """What left the site, task by task."""
        from ..egress_log import EGRESS_FILE

        return self.state_dir / EGRESS_FILE

    def privacy(self) -> dict[str, Any]:
        """:func:`privacy_report`, recomputed when the ledger file changes."""
        from ..ledger import ledger_file

        path = ledger_file(self.site.ledger_path)
        try:
            info = path.stat()
            stamp: tuple[Any, ...] = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = ()
        with self._lock:
            if self._privacy is None or self._privacy[0] != stamp:
                self._privacy = (stamp, privacy_report(self.site))
            return self._privacy[1]

    def egress_tally(self) -> JsonlTally[TaskTotals]:
        """Tasks, bytes and wall time over the whole egress log, read incrementally."""
        with self._lock:
            if self._egress_tally is None:
                self._egress_tally = JsonlTally(self.egress_path, TaskTotals, fold_task)
            return self._egress_tally

    def refusal_tally(self) -> JsonlTally[dict[str, int]]:
        """Refusal events over the whole audit log, read incrementally."""
        with self._lock:
            if self._refusal_tally is None:
                self._refusal_tally = JsonlTally(
                    self.audit_path, no_refusals, fold_refusal
                )
            return self._refusal_tally

    def approvals(self) -> list[dict[str, Any]]:
        """Approved app hashes, oldest first, with the settings shown at approval."""
        from ..approvals import AppApprovals

        approved = AppApprovals(self.state_dir).load()
        return [
            {"hash": fab_hash, **row}
            for fab_hash, row in sorted(
                approved.items(), key=lambda kv: kv[1].get("approved_at", "")
            )
        ]

    def egress(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest tasks' replies, newest first."""
        from ..egress_log import read_egress

        return list(reversed(read_egress(self.egress_path, limit)))
