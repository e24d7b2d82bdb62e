"""Which Flower App Bundles (FABs) a site has approved, and whether a FAB is acceptable.

A site trains only runs it approved: the sha256 of the run's FAB must be on the
site's allowlist (``wardround site approve HASH``), and the FAB must name
wardround's own ServerApp and ClientApp. The site never executes code from a FAB:
the installed wardround ClientApp serves every approved run, so approving a hash
approves a run definition (its settings), not foreign code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tomllib
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError

APPROVALS_FILE = "approved-apps.json"
CLIENT_APP_REF = "wardround.client.app:app"
SERVER_APP_REF = "wardround.server.app:app"
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Decision:
    """Whether a FAB may run here, and why not."""

    approved: bool
    reason: str = ""


def normalize_hash(text: str) -> str:
    """A FAB hash as 64 lower-case hex digits; ConfigError otherwise."""
    value = text.strip().lower()
    if not _HASH.match(value):
        raise ConfigError(
            "an app hash is the full sha256 of the FAB: 64 hex digits",
            hint="Copy the hash that `wardround launch --print-hash` shows.",
        )
    return value


RUN_OVERRIDES = frozenset({"output.dir", "output.resume"})
"""Run settings the coordinator may set outside the approved app: where its own run
directory goes and whether it resumes. Everything else the site trains with must be
exactly what the approved FAB says."""


def _fab_app_table(fab: bytes) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            project = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    return project.get("tool", {}).get("flwr", {}).get("app", {})


def fab_components(fab: bytes) -> dict[str, Any]:
    """The ``[tool.flwr.app.components]`` table of a FAB's pyproject.toml ({} if none)."""
    return _fab_app_table(fab).get("components", {})


def fab_run_config(fab: bytes) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of a FAB (flat dotted keys)."""
    table = _fab_app_table(fab).get("config", {})
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", table)
    return flat


def changed_settings(fab: bytes, run_config: dict[str, Any]) -> list[str]:
    """Run settings that differ from the approved FAB's (allowed overrides aside)."""
    approved = fab_run_config(fab)
    keys = (set(approved) | set(run_config)) - RUN_OVERRIDES
    return sorted(k for k in keys if approved.get(k) != run_config.get(k))


SHOWN_SECTIONS = (
    "privacy",
    "secure-aggregation",
    "federation",
    "model",
    "task",
    "train",
)
"""The run settings a site operator reads before approving a run, the privacy ones
first. The app hash covers the other two sections as well, which do not reach a
site: ``[data]`` names simulated sites (a deployed run refuses them) and
``[output]`` where the coordinator writes its run directory."""


def describe_run(run: Any) -> list[str]:
    """The settings of a run (a ``RunConfig``) that matter to a site, as text lines.

    One ``[section]`` header per shown section, then ``key = value`` lines in the
    run.toml spelling. Every value is written as JSON, strings quoted and escaped
    (ASCII only): a value cannot start a line of its own or move the cursor of the
    terminal the operator reads it on, whatever the run config holds.
    """
    settings = run.model_dump(mode="json", by_alias=True)
    lines: list[str] = []
    for section in SHOWN_SECTIONS:
        lines.append(f"[{section}]")
        for key, value in settings[section].items():
            lines.append(f"  {key} = {json.dumps(value)}")
    return lines


def fitted(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters (an ellipsis marks the cut).

    On the operator's terminal a wrapped line could start a visual line that
    reads like one of the screen's own (``  enabled = true``).
    """
    return line if len(line) <= width else line[: max(width - 1, 1)] + "…"


def approval_summary(run: Any, fab_hash: str) -> str:
    """One line on what matters most, printed again just above the question."""
    privacy = run.privacy
    dp = (
        f"DP-SGD on (ε {privacy.target_epsilon:g}, δ {privacy.target_delta:g})"
        if privacy.enabled
        else "DP-SGD OFF"
    )
    secagg = "SecAgg+ on" if run.secure_aggregation.enabled else "SecAgg+ OFF"
    return f"approving {fab_hash[:12]}…: {dp}, {secagg}, {run.federation.rounds} rounds"


class AppApprovals:
    """The site's allowlist of FAB hashes, kept in ``<state-dir>/approved-apps.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / APPROVALS_FILE

    def load(self) -> dict[str, dict[str, Any]]:
        """Approved hashes -> {approved_at, note[, settings]}; damaged: ConfigError."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return dict(data["approved"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.path} is not a valid approvals file ({type(exc).__name__})",
                hint="Restore it from a backup, or delete it and approve the apps again.",
            ) from None

    def approve(
        self, fab_hash: str, note: str = "", settings: list[str] | None = None
    ) -> str:
        """Add a hash (written atomically, mode 0600); return it normalized.

        ``settings``: the run's settings as shown at approval (:func:`describe_run`),
        kept so the site dashboard can show what each hash stands for.
        """
        value = normalize_hash(fab_hash)
        approved = self.load()
        approved[value] = {
            "approved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "note": note,
        }
        if settings is not None:
            approved[value]["settings"] = list(settings)
        self._write(approved)
        return value

    def revoke(self, fab_hash: str) -> bool:
        """Remove a hash; return whether it was there."""
        value = normalize_hash(fab_hash)
        approved = self.load()
        found = approved.pop(value, None) is not None
        if found:
            self._write(approved)
        return found

    def check(
        self, fab_hash: str, fab: bytes, run_config: dict[str, Any] | None = None
    ) -> Decision:
        """Decide whether a run with this FAB (and these run settings) may train here.

        The hash that counts is the sha256 of the FAB's bytes, not the one it is
        announced under.
        """
        if hashlib.sha256(fab).hexdigest() != fab_hash:
            return Decision(
                False,
                f"app {fab_hash} does not hash to its announced hash; this site runs "
                "only the bytes it approved",
            )
        if fab_hash not in self.load():
            return Decision(
                False,
                f"this site has not approved app {fab_hash}; the site operator "
                "approves it from the run's run.toml, which shows what it approves: "
                "`wardround site approve --run-config run.toml --config site.toml` "
                f"(the hash must come out as {fab_hash[:16]}…)",
            )
        components = fab_components(fab)
        if components.get("clientapp") != CLIENT_APP_REF:
            return Decision(
                False,
                f"app {fab_hash} does not run wardround's ClientApp "
                f"({CLIENT_APP_REF}); this site runs nothing else",
            )
        if run_config is not None and (changed := changed_settings(fab, run_config)):
            return Decision(
                False,
                f"the run changes settings of approved app {fab_hash}: "
                f"{', '.join(changed[:5])}; a changed run is a new app to approve",
            )
        return Decision(True)

    def _write(self, approved: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"approved": approved}, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, self.path)
