"""What the coordinator's dashboard shows, read from its files (never written).

The sources are the run directories (``launch.json``, ``status.json``,
``rounds.jsonl``, ``run.json``, ``run-config.toml``, ``manifests/``, ``adapter/``),
``sites.json`` and the audit logs; whether a site is online comes from the
SuperLink (``wardround sites list``), asked at most every few seconds.
"""

from __future__ import annotations

import json
import re
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...common.config import personalised_in

LIVE_STATES = frozenset({"starting", "running", "paused"})
MANIFEST_NAME = re.compile(r"round-\d{3,6}\.json")
SITE_STATUS_TTL_S = 3.0


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when missing, half-written or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``rounds.jsonl``; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / "rounds.jsonl"
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def is_run_dir(path: Path) -> bool:
    """A folder a run wrote (deployed or simulated)."""
    return any(
        (Path(path) / name).is_file()
        for name in ("launch.json", "rounds.jsonl", "run.json", "status.json")
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((run_dir / "run-config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _node_names(rounds: list[dict[str, Any]], known: dict[int, str]) -> dict[int, str]:
    names = dict(known)
    for row in rounds:
        for report in (*row.get("train", []), *row.get("evaluate", [])):
            if "node_id" in report and "site" in report:
                names[int(report["node_id"])] = str(report["site"])
    return names


@dataclass
class RunView:
    """One run as the pages show it."""

    name: str
    """The run's name (``launch.json``'s, else its folder's)."""
    path: Path
    state: str
    rounds_done: int
    rounds_planned: int | None
    reason: str | None
    launched_at: str | None
    fab_hash: str | None
    wardround_version: str | None
    dp_enabled: bool | None
    target_epsilon: float | None
    rounds: list[dict[str, Any]] = field(repr=False, default_factory=list)
    manifests: list[str] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    personalised: bool = False
    """Each site evaluates a model of its own (``federation.personal`` or
    ``own-model-weight``): the sites' mean AUROC is no one global model's."""

    @property
    def key(self) -> str:
        """The run's folder name: what the pages' addresses name it by.

        It differs from :attr:`name` in a copy (``launch --out DIR``).
        """
        return self.path.name

    @property
    def scored(self) -> str:
        """What the rounds' mean AUROC and loss are of, as the pages name it."""
        return "all sites" if self.personalised else "global"

    @property
    def live(self) -> bool:
        """The run has not ended."""
        return self.state in LIVE_STATES

    @property
    def has_adapter(self) -> bool:
        """A global adapter can be downloaded (final, or the last checkpoint)."""
        return adapter_source(self.path) is not None


def load_run(run_dir: Path) -> RunView:
    """Everything the pages need about one run directory."""
    run_dir = Path(run_dir)
    launch = read_json(run_dir / "launch.json")
    status = read_json(run_dir / "status.json")
    summary = read_json(run_dir / "run.json")
    config = _run_config(run_dir)
    rounds = read_rounds(run_dir)
    done = max(len(rounds) - 1, 0)  # round 0 is the evaluation before training
    state = status.get("state") or ("finished" if summary else "starting")
    privacy = config.get("privacy", {})
    planned = status.get("rounds") or config.get("federation", {}).get("rounds")
    manifests = sorted(
        p.name
        for p in (run_dir / "manifests").glob("round-*.json")
        if MANIFEST_NAME.fullmatch(p.name)
    )
    return RunView(
        name=launch.get("name") or run_dir.name,
        path=run_dir,
        state=str(state),
        rounds_done=done,
        rounds_planned=int(planned) if planned else None,
        reason=status.get("reason"),
        launched_at=launch.get("launched_at") or summary.get("started"),
        fab_hash=launch.get("fab_hash"),
        wardround_version=launch.get("wardround_version"),
        dp_enabled=privacy.get("enabled"),
        target_epsilon=privacy.get("target-epsilon"),
        rounds=rounds,
        manifests=manifests,
        final=summary.get("final") or {},
        personalised=personalised_in(config.get("federation", {})),
    )


def adapter_source(run_dir: Path) -> Path | None:
    """The final adapter folder, else the newest checkpoint folder, else None."""
    final = Path(run_dir) / "adapter"
    if final.is_dir() and any(final.iterdir()):
        return final
    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    return checkpoints[-1] if checkpoints else None


def adapter_bytes(run_dir: Path) -> int | None:
    """The size of the newest global adapter checkpoint (what a site downloads)."""
    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    for folder in reversed(checkpoints):
        files = list(folder.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return None


def learning_series(
    run: RunView,
) -> tuple[dict[str, list[tuple[int, float | None]]], dict[str, list]]:
    """AUROC and loss per round: one series per site, and the sites' mean.

    The mean is named ``global``, or ``all sites`` when each site scores a model
    of its own (:attr:`RunView.scored`).
    """
    mean = run.scored
    auroc: dict[str, list[tuple[int, float | None]]] = {mean: []}
    loss: dict[str, list[tuple[int, float | None]]] = {mean: []}
    for row in run.rounds:
        r = row["round"]
        auroc[mean].append((r, row.get("global_auroc")))
        loss[mean].append((r, row.get("global_loss")))
        for report in row.get("evaluate", []):
            site = str(report.get("site"))
            auroc.setdefault(site, []).append((r, report.get("auroc_macro")))
            loss.setdefault(site, []).append((r, report.get("loss")))
    return auroc, loss


def _share(spent: float | None, limit: float | None) -> tuple[Any, Any]:
    """What remains of ``limit`` after ``spent``, and the share used (None if unknown)."""
    if spent is None or limit is None:
        return None, None
    return limit - spent, (spent / limit if limit else None)


def privacy_rows(run: RunView) -> list[dict[str, Any]]:
    """Each site's last reported DP accounting in this run.

    Against the run's target (this run's ε) and against the site's lifetime budget
    (ε over every run in the site's ledger), as far as the site reported it.
    """
    last: dict[str, dict[str, Any]] = {}
    for row in run.rounds:
        for report in row.get("train", []):
            if report.get("privacy"):
                last[str(report["site"])] = {"round": row["round"], **report["privacy"]}
    rows = []
    for site, spend in sorted(last.items()):
        eps = spend.get("epsilon_run")
        total = spend.get("epsilon_total")
        budget = spend.get("epsilon_budget")
        remaining, used = _share(eps, run.target_epsilon)
        budget_remaining, budget_used = _share(total, budget)
        rows.append(
            {
                "site": site,
                "round": spend["round"],
                "epsilon_run": eps,
                "epsilon_total": total,
                "delta": spend.get("delta"),
                "noise_multiplier": spend.get("noise_multiplier"),
                "target_epsilon": run.target_epsilon,
                "remaining": remaining,
                "used_share": used,
                "epsilon_budget": budget,
                "budget_remaining": budget_remaining,
                "budget_used_share": budget_used,
            }
        )
    return rows


def traffic_rows(run: RunView) -> tuple[list[int], dict[str, list[float]]]:
    """Bytes each site sent per training round (0 where it sent nothing)."""
    rounds = [row["round"] for row in run.rounds if row["round"] > 0]
    sites = sorted({str(t["site"]) for row in run.rounds for t in row.get("train", [])})
    series: dict[str, list[float]] = {site: [] for site in sites}
    for row in run.rounds:
        if row["round"] <= 0:
            continue
        sent = {str(t["site"]): t.get("bytes_sent", 0) for t in row.get("train", [])}
        for site in sites:
            series[site].append(float(sent.get(site, 0)))
    return rounds, series


@dataclass
class CoordinatorSource:
    """Where the coordinator's dashboard reads: run folders, sites, audit logs.

    ``site_status`` returns ``wardround sites list`` rows (the SuperLink's view);
    None when no coordinator is running (``wardround dashboard`` over a run folder).
    """

    runs_root: Path | None = None
    single_run: Path | None = None
    sites_path: Path | None = None
    audit_paths: tuple[Path, ...] = ()
    site_status: Callable[[], list[dict[str, Any]]] | None = None
    _cache: tuple[float, list[dict[str, Any]]] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run_dirs(self) -> list[Path]:
        """Run directories, newest first."""
        if self.single_run is not None:
            return [self.single_run]
        if self.runs_root is None or not self.runs_root.is_dir():
            return []
        return sorted(
            (p for p in self.runs_root.iterdir() if p.is_dir() and is_run_dir(p)),
            reverse=True,
        )

    def runs(self) -> list[RunView]:
        """Every run, newest first."""
        return [load_run(p) for p in self.run_dirs()]

    def find_run(self, key: str) -> RunView | None:
        """A run by its folder's exact name (:attr:`RunView.key`).

        None for anything else: no path tricks.
        """
        for path in self.run_dirs():
            if path.name == key:
                return load_run(path)
        return None

    def live_sites(self) -> list[dict[str, Any]] | None:
        """The SuperLink's view of the enrolled sites, cached a few seconds."""
        if self.site_status is None:
            return None
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] > SITE_STATUS_TTL_S:
                self._cache = (now, self.site_status())
            return self._cache[1]

    def sites(self) -> list[dict[str, Any]]:
        """One row per site: enrolment, state, last seen, rounds taken part and refused."""
        from ..registry import load_sites

        enrolled = load_sites(self.sites_path) if self.sites_path else {}
        live = {row["site"]: row for row in (self.live_sites() or [])}
        node_names = {site.node_id: name for name, site in enrolled.items()}
        runs = self.runs()
        rows: dict[str, dict[str, Any]] = {}

        def row_for(name: str, attributed: bool = True) -> dict[str, Any]:
            if name not in rows:
                site = enrolled.get(name)
                status = live.get(name, {})
                rows[name] = {
                    "site": name,
                    "enrolled_at": site.enrolled_at if site else None,
                    "revoked_at": site.revoked_at if site else None,
                    "node_id": site.node_id if site else None,
                    "state": status.get("state")
                    or ("revoked" if site and not site.active else "unknown"),
                    "online_at": _seen(status.get("online_at")),
                    "offline_at": _seen(status.get("offline_at")),
                    "software_version": None,
                    "rounds_taken_part": 0,
                    "rounds_refused": 0,
                    "refusals": [],
                    "attributed": attributed,
                }
            return rows[name]

        for name in enrolled:
            row_for(name)
        for run in runs:  # newest first: a site's newest reply names its release
            names = _node_names(run.rounds, node_names)
            for round_row in reversed(run.rounds):
                for report in (
                    *round_row.get("train", []),
                    *round_row.get("evaluate", []),
                ):
                    row = row_for(str(report["site"]))
                    if row["software_version"] is None:
                        row["software_version"] = report.get("software_version")
            for round_row in run.rounds:
                for report in round_row.get("train", []):
                    row_for(str(report["site"]))["rounds_taken_part"] += 1
                for failure in round_row.get("failures", []):
                    # Flower's own errors (a node that stopped answering) name the
                    # SuperLink as their source, not the site: kept apart.
                    node = int(failure.get("node_id", -1))
                    row = (
                        row_for(names[node])
                        if node in names
                        else row_for(f"node {node}", attributed=False)
                    )
                    row["rounds_refused"] += 1
                    row["refusals"].append(
                        {
                            "run": run.name,
                            "round": round_row["round"],
                            "phase": failure.get("phase"),
                            "kind": failure.get("kind"),
                            "reason": failure.get("reason"),
                        }
                    )
        return [rows[name] for name in sorted(rows)]


def _seen(value: Any) -> str | None:
    return None if value in (None, "", "N/A") else str(value)
