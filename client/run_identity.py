"""Which run a message belongs to, as the site sees it.

A hostile coordinator can name any run id in a message; a site that keyed its
per-run epsilon cap and its answer allowance on that id would grant a fresh cap to
every id. So the site names the run itself, from what it approved: the run's
settings (every section but ``[output]``, which only says where the coordinator
writes). In a deployment those settings are pinned to the approved app's hash
(:mod:`wardround.client.approvals`), so one approved app is one run here,
whichever Flower run the coordinator launches it as, resumed or relaunched.

In a simulation the researcher is the coordinator, and every simulation is a new
run: there the Flower run and the run id are part of the identity.
"""

from __future__ import annotations

import hashlib
import json

from ..common.config import RunConfig

_EXCLUDED_SECTIONS = frozenset({"output"})
_LATER_SETTINGS = {
    ("federation", "repeatable_rounds"): 0,
    ("federation", "round_retries"): 2,
    ("federation", "own_model_weight"): 0.0,
}
"""Settings added after the key existed, left out at their neutral value: a site
upgraded to a release that has them must keep naming an approved run as before,
or the run's epsilon cap and answer allowance would start again from zero."""


def approved_run_key(config: RunConfig) -> str:
    """The sha256 of the run's approved settings (32 hex digits)."""
    settings = config.model_dump(mode="json", exclude=set(_EXCLUDED_SECTIONS))
    for (section, name), neutral in _LATER_SETTINGS.items():
        if settings[section].get(name) == neutral:
            del settings[section][name]
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def run_identity(
    config: RunConfig, *, simulation: bool, flower_run: int, named_run: str
) -> str:
    """The run a message counts against at this site.

    ``flower_run`` and ``named_run`` (what the message says) count only in a
    simulation, where nobody but the researcher runs the coordinator.
    """
    key = approved_run_key(config)
    if not simulation:
        return key
    named = hashlib.sha256(named_run.encode()).hexdigest()[:12]
    return f"{key}-sim{int(flower_run)}-{named}"
