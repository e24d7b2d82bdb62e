"""Where the study's arms run: sizes, bases, cells and the size presets (pure).

A *cell* is one setting the arms run in: patients per site, site count and base
(the pretrained encoders or random ones). ``smoke`` and ``full`` are the presets
:class:`~.plan.StudySettings` starts from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ...common.errors import ConfigError

log = logging.getLogger(__name__)


class StudySize(StrEnum):
    """``smoke``: seconds, for tests and CI; ``full``: the published figures."""

    SMOKE = "smoke"
    FULL = "full"


RANDOM_BASE = "random"
PRETRAINED_BASE = "pretrained"
OWN_DATA = 0
"""``patients`` of the cells of ``--sites-dir``: each site has what it has."""


def base_label(base: str) -> str:
    """What files, keys and the report call a base: its name, or its folder's name."""
    if base in (RANDOM_BASE, PRETRAINED_BASE):
        return base
    return Path(base).name or base


@dataclass(frozen=True)
class Cell:
    """One setting the arms run in: patients per site, site count, base."""

    patients: int
    sites: int
    base: str
    """'pretrained' (the public synthetic base), 'random', or a base folder."""

    @property
    def own_data(self) -> bool:
        """The sites of ``--sites-dir`` (patients: theirs), not synthetic ones."""
        return self.patients == OWN_DATA

    @property
    def key(self) -> str:
        """Identifier: JSON keys, e.g. '200x3-pretrained' ('sites3-…': own data)."""
        size = "sites" if self.own_data else f"{self.patients}x"
        return f"{size}{self.sites}-{base_label(self.base)}"

    @property
    def label(self) -> str:
        """What the report calls it."""
        size = "own data" if self.own_data else f"{self.patients:,} patients/site"
        return f"{size}, {self.sites} sites, {base_label(self.base)} base"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "patients": self.patients,
            "sites": self.sites,
            "base": base_label(self.base),
        }


PRESETS: dict[StudySize, dict[str, Any]] = {
    StudySize.SMOKE: {
        "site_counts": (3,),
        "patients": (40,),
        "seeds_per_patients": {40: 1},
        # Random only: a pretrained base for the smoke's shapes (image 32², 32
        # note tokens) would be built on first use, about a minute; the tests
        # run the smoke with a tiny base folder instead.
        "bases": (RANDOM_BASE,),
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 8,  # the DP recipe's 64 exceeds a smoke site's training split
        "image_size": 32,
        "max_note_tokens": 32,
        "mus": (0.1,),
        "epsilons": (8.0,),
        "ablation_site_counts": (3,),
        "dp_goal_patients": 40,
        "local_goal_patients": 40,
    },
    StudySize.FULL: {
        "site_counts": (3, 8),
        "patients": (200, 1000, 3000),
        # the larger sizes cost 5× and 15× a 200-patient arm: fewer seeds
        "seeds_per_patients": {200: 3, 1000: 2, 3000: 1},
        "bases": (PRETRAINED_BASE, RANDOM_BASE),
        "rounds": 5,
        "local_epochs": 2,
        "batch_size": 0,  # the recipe's: 16 without DP, 64 under DP-SGD
        "image_size": 64,
        "max_note_tokens": 128,
        "mus": (0.01, 0.1, 1.0),
        "epsilons": (1.0, 3.0, 8.0),
        "ablation_site_counts": (3,),
        "dp_goal_patients": 1000,
        "local_goal_patients": 200,
    },
}


_LEFT_OUT_SAID: set[tuple[str, tuple[str, ...]]] = set()


def site_tomls_in(folder: Path) -> list[Path]:
    """The ``site.toml`` of every site folder directly in ``folder`` (sorted)."""
    if not folder.is_dir():
        raise ConfigError(
            f"--sites-dir {folder} is not a folder",
            hint="Give a folder that holds one folder per site, each with its site.toml.",
        )
    tomls = sorted(folder.glob("*/site.toml"))
    skipped = sorted(
        sub
        for sub in folder.iterdir()
        if sub.is_dir()
        and not sub.name.startswith(".")
        and not (sub / "site.toml").is_file()
    )
    misnamed = [
        f for sub in skipped for f in sub.iterdir() if f.name.lower() == "site.toml"
    ]
    if misnamed:
        raise ConfigError(
            f"--sites-dir {folder}: {misnamed[0]} is not named site.toml",
            hint=f"Rename it to {misnamed[0].parent / 'site.toml'} (the name is "
            "case-sensitive), or move the folder out of --sites-dir.",
        )
    said = (str(folder), tuple(sub.name for sub in skipped))
    if skipped and said not in _LEFT_OUT_SAID:  # once, not once per arm
        _LEFT_OUT_SAID.add(said)
        log.warning(
            "--sites-dir %s: %d folder(s) without a site.toml are not sites and are "
            "left out: %s",
            folder,
            len(skipped),
            ", ".join(sub.name for sub in skipped),
        )
    if len(tomls) < 2:
        raise ConfigError(
            f"--sites-dir {folder} holds {len(tomls)} site folder(s) with a site.toml; "
            "a federation needs at least 2",
            hint=(
                f"{folder} is itself a site (it holds site.toml): give the folder "
                "that holds the site folders."
                if (folder / "site.toml").is_file()
                else "Put one folder per site in it, each with the site.toml that "
                "`wardround site check` accepts."
            ),
        )
    return tomls
