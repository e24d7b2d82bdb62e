"""What the learning-quality study runs: which arms, in which cells, how (pure).

The arms are in :mod:`.catalog`, the cells, sizes and presets in :mod:`.cells`;
both are re-exported here. Every arm of a cell sees the same synthetic hospitals,
the same seeds and the same number of training examples (``rounds × local-epochs``
passes over each site's training split), and is evaluated on the same per-site
validation split.

The cells span three axes: base × patients per site × DP. Every arm runs on the
*primary* cells (the smallest size, the primary base); every other size and base
runs the privacy axis (pooled, local-only, FedAvg, FedAvg + DP per ε) and
the personalised arms, on the ablation site counts.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ...common.config import RunConfig
from ...common.errors import ConfigError
from ...common.recipe import training_recipe
from ...common.secagg_math import MIN_PARTICIPANTS
from ...ops.config_file import load_run_config
from ...synthetic.shift import STUDY_HETEROGENEITY, Heterogeneity
from .catalog import (
    PERSONAL_MODULES,
    Arm,
    ArmGroup,
    ArmKind,
    classical_arms,
    standard_arms,
)
from .cells import (
    OWN_DATA,
    PRESETS,
    PRETRAINED_BASE,
    RANDOM_BASE,
    Cell,
    StudySize,
    base_label,
    site_tomls_in,
)

__all__ = [
    "OWN_DATA",
    "PERSONAL_MODULES",
    "PRETRAINED_BASE",
    "RANDOM_BASE",
    "Arm",
    "ArmGroup",
    "ArmKind",
    "Cell",
    "StudySettings",
    "StudySize",
    "base_label",
    "classical_arms",
    "site_tomls_in",
    "standard_arms",
]


THIN_CLASS = 5
"""Fewer positive (or negative) validation examples of a finding than this at a
site, and its AUROC there moves in large steps between arms: the report names them."""


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides a study's numbers, parsed once from the CLI."""

    size: StudySize
    site_counts: tuple[int, ...]
    patients: tuple[int, ...]
    """Patients per site of each size, ascending; the first runs every arm."""
    seed_counts: tuple[int, ...]
    """Seeds (0..N-1) per entry of ``patients``: the larger sizes may run fewer."""
    bases: tuple[str, ...]
    rounds: int
    local_epochs: int
    batch_size: int
    """0: the recipe's batch (16 without DP; 1/8 of a site's training patients under DP-SGD)."""
    image_size: int
    max_note_tokens: int
    mus: tuple[float, ...]
    epsilons: tuple[float, ...]
    ablation_site_counts: tuple[int, ...]
    """Site counts that run the privacy axis at every size and base, and (at the
    primary cell) every arm; the others run the reference and strategy arms only
    (pooled, local-only, FedAvg, FedProx), at the smallest size and primary base."""
    dp_goal_patients: int
    """The size the 'DP keeps X of pooled' goals are checked at."""
    local_goal_patients: int
    """The size the 'DP above every site's local-only model' goal is checked at."""
    heterogeneity: Heterogeneity = STUDY_HETEROGENEITY
    arms: tuple[Arm, ...] = field(default=())
    sites_dir: str | None = None
    """A folder of real site folders (each with its site.toml) to run on instead of
    synthetic hospitals; ``patients`` is then ``(OWN_DATA,)``."""
    run_config: str | None = None
    """A run config TOML whose task (labels, EHR features) and model the arms
    start from; the study sets rounds, epochs, shapes and each arm's settings."""
    data_identity: dict[str, str] = field(default_factory=dict)
    """``--sites-dir``: site -> its dataset fingerprint (part of every arm key)."""
    missing: dict[str, str] = field(default_factory=dict)
    """Modality -> why no site has it (the runner fills it from the sites' data):
    an arm that needs only missing modalities is skipped with that reason."""
    site_decimals: dict[str, int] = field(default_factory=dict)
    """``--sites-dir``: site -> its ``[answers] decimals`` (default 3): a site's
    federated AUROC is compared with its local-only one at that precision."""
    site_gaps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``--sites-dir``: site -> the modalities none of its validation studies has.
    An arm that needs only those is not scored at that site (it would score its
    untrained prior, a tie: 0.5)."""
    site_not_recorded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``--sites-dir``: site -> the run's labels and features its ``[ehr]
    not-recorded`` declares (unknown in every row there)."""
    site_thin_labels: dict[str, dict[str, tuple[int, int]]] = field(
        default_factory=dict
    )
    """``--sites-dir``: site -> label -> (positives, negatives) in its validation
    split, for labels with few examples of a class there."""

    def __post_init__(self) -> None:
        if not self.arms:
            object.__setattr__(self, "arms", standard_arms(self.mus, self.epsilons))
        problems = []
        if not self.site_counts or min(self.site_counts) < 2:
            problems.append("--sites needs counts of at least 2 (a federation)")
        if self.sites_dir is not None:
            if self.patients != (OWN_DATA,):
                problems.append("--patients cannot be set with --sites-dir")
        elif not self.patients or min(self.patients) < 10:
            problems.append("--patients needs sizes of at least 10 patients per site")
        elif list(self.patients) != sorted(set(self.patients)):
            problems.append("--patients must list each size once, ascending")
        if (
            len(self.seed_counts) != len(self.patients)
            or min(self.seed_counts, default=0) < 1
        ):
            problems.append(
                "--seeds must be at least 1, one count or one per --patients size"
            )
        if not self.bases or len(set(map(base_label, self.bases))) != len(self.bases):
            problems.append("--bases must name each base once")
        if problems:
            raise ConfigError(
                "; ".join(problems), hint="See `wardround study quality --help`."
            )

    @classmethod
    def for_size(
        cls,
        size: StudySize,
        *,
        site_counts: tuple[int, ...] | None = None,
        seeds: int | tuple[int, ...] | None = None,
        patients: tuple[int, ...] | None = None,
        bases: tuple[str, ...] | None = None,
    ) -> StudySettings:
        """The preset of ``size``, with site counts, sizes, seeds and bases overridden.

        ``seeds``: one count for every size, or one per size; by default the
        preset's count for a size it knows and 1 for any other.
        """
        preset = dict(PRESETS[StudySize(size)])
        preset_seeds = preset.pop("seeds_per_patients")
        counts = tuple(site_counts) if site_counts else preset["site_counts"]
        given = tuple(patients) if patients else preset["patients"]
        if seeds is None:
            per_size = tuple(preset_seeds.get(p, 1) for p in given)
        elif isinstance(seeds, int):
            per_size = (seeds,) * len(given)
        elif len(seeds) == 1:
            per_size = tuple(seeds) * len(given)
        else:
            per_size = tuple(seeds)
        if len(per_size) == len(given) and len(set(given)) == len(given):
            # ascending sizes, each with its own seed count
            given, per_size = zip(
                *sorted(zip(given, per_size, strict=True)), strict=True
            )
        sizes, seed_counts = tuple(given), tuple(per_size)
        values = {
            **preset,
            "site_counts": counts,
            "patients": sizes,
            "seed_counts": seed_counts,
            "bases": tuple(bases) if bases else preset["bases"],
            "ablation_site_counts": tuple(
                c for c in counts if c in preset["ablation_site_counts"]
            )
            or counts[:1],
        }
        return cls(size=StudySize(size), **values)

    @classmethod
    def for_sites_dir(
        cls,
        size: StudySize,
        sites_dir: Path,
        *,
        seeds: int = 1,
        bases: tuple[str, ...] | None = None,
        run_config: Path | None = None,
    ) -> StudySettings:
        """The preset of ``size`` on the site folders in ``sites_dir``."""
        folder = Path(sites_dir).expanduser().resolve()
        tomls = site_tomls_in(folder)
        preset = dict(PRESETS[StudySize(size)])
        preset.pop("seeds_per_patients")
        n = len(tomls)
        values = {
            **preset,
            "site_counts": (n,),
            "patients": (OWN_DATA,),
            "seed_counts": (seeds,),
            "bases": tuple(bases) if bases else preset["bases"],
            "ablation_site_counts": (n,),
            "dp_goal_patients": OWN_DATA,
            "local_goal_patients": OWN_DATA,
        }
        return cls(
            size=StudySize(size),
            sites_dir=str(folder),
            run_config=str(Path(run_config).resolve()) if run_config else None,
            **values,
        )

    # -- cells and arms -----------------------------------------------------------
    @property
    def primary_base(self) -> str:
        """The base the ablations run on: the first that is not random."""
        return next((b for b in self.bases if b != RANDOM_BASE), self.bases[0])

    def seeds_for(self, patients: int) -> tuple[int, ...]:
        """The seeds of one size."""
        return tuple(range(self.seed_counts[self.patients.index(patients)]))

    def is_primary(self, cell: Cell) -> bool:
        """The smallest size on the primary base: where the ablations run."""
        return cell.patients == self.patients[0] and cell.base == self.primary_base

    def arms_for(self, cell: Cell) -> tuple[Arm, ...]:
        """The arms run in ``cell`` (none: the cell is not part of the study).

        SecAgg+ arms need at least 3 sites (sites refuse it among fewer): a
        federation of 2 runs without them (:meth:`arms_left_out`).
        """
        arms = tuple(a for a in self.arms if a.name not in self.skipped())
        if cell.sites < MIN_PARTICIPANTS:
            arms = tuple(a for a in arms if not a.secure_aggregation)
        axis = cell.sites in self.ablation_site_counts
        if self.is_primary(cell):
            if axis:
                return arms
            core = (ArmGroup.REFERENCE, ArmGroup.CLASSICAL, ArmGroup.STRATEGY)
            return tuple(a for a in arms if a.group in core)
        if axis:
            return tuple(a for a in arms if a.every_cell)
        return ()

    def cells(self) -> tuple[Cell, ...]:
        """Every cell with arms: by size, then site count, then base (primary first)."""
        bases = (self.primary_base, *(b for b in self.bases if b != self.primary_base))
        return tuple(
            cell
            for p in self.patients
            for n in self.site_counts
            for base in bases
            if self.arms_for(cell := Cell(p, n, base))
        )

    def skipped(self) -> dict[str, str]:
        """Arm name -> why the sites' data cannot support it (``missing``)."""
        out = {}
        for arm in self.arms:
            wanted = [m.value for m in arm.modalities]
            if all(m in self.missing for m in wanted):
                out[arm.name] = "; ".join(self.missing[m] for m in wanted)
        return out

    def unscored_sites(self, arm: Arm) -> dict[str, str]:
        """Site -> why ``arm`` is not scored there: no validation study has its inputs."""
        wanted = [m.value for m in arm.modalities]
        out = {}
        for site, gaps in sorted(self.site_gaps.items()):
            if all(m in gaps for m in wanted):
                names = ", ".join("images" if m == "image" else m + "s" for m in wanted)
                out[site] = f"{site} has no {names} in its validation split"
        return out

    def arms_left_out(self, n_sites: int) -> tuple[Arm, ...]:
        """The SecAgg+ arms a federation of fewer than 3 sites cannot run."""
        if n_sites >= MIN_PARTICIPANTS:
            return ()
        return tuple(a for a in self.arms if a.secure_aggregation)

    def arm_count(self, patients: int) -> int:
        """Arm runs of one size, over its seeds."""
        per_seed = sum(
            len(self.arms_for(c)) for c in self.cells() if c.patients == patients
        )
        return per_seed * len(self.seeds_for(patients))

    # -- run configs --------------------------------------------------------------
    def base_config(
        self, sites_dir: str, cell: Cell, seed: int, base_folder: str | None = None
    ) -> RunConfig:
        """The run config every arm of one cell and seed starts from.

        Secure aggregation is off here; each arm says whether it uses it. Batch
        size, learning rate, optimizer and trainable scope are the recipe's
        (common/recipe.py: one without DP, one under DP-SGD), except a batch size
        the preset sets (the smoke's sites are smaller than the DP batch).
        ``base_folder``: where the cell's pretrained base is (the runner resolves
        'pretrained' once, so every arm, modality ablations included, uses the
        same base).
        """
        train: dict[str, Any] = {"local_epochs": self.local_epochs, "torch_threads": 1}
        if self.batch_size:
            train["batch_size"] = self.batch_size
        start = (
            load_run_config(Path(self.run_config)) if self.run_config else RunConfig()
        )
        if self.sites_dir is not None and not self._run_config_sets_require_image():
            # a real site may have no imaging, or studies without an image: they
            # train on their EHR and note (the missing-modality path), unless the
            # researcher's run config says otherwise
            start = start.with_overrides(task={"require_image": False})
        return start.with_overrides(
            federation={"rounds": self.rounds, "min_sites": cell.sites, "seed": seed},
            secure_aggregation={"enabled": False},
            train=train,
            model={
                "image_size": self.image_size,
                "max_note_tokens": self.max_note_tokens,
                "init_seed": seed,
                "base": base_folder or cell.base,
            },
            data={"sites_dir": sites_dir},
            output={"checkpoint_every": self.rounds},
        )

    def _run_config_sets_require_image(self) -> bool:
        if not self.run_config:
            return False
        doc = tomllib.loads(Path(self.run_config).read_text())
        return "require-image" in doc.get("task", {})

    def arm_config(
        self,
        arm: Arm,
        cell: Cell,
        sites_dir: str,
        seed: int,
        run_dir: str,
        base_folder: str | None = None,
    ) -> RunConfig:
        """The run config of ``arm`` in one cell and seed.

        ``model.trainable`` is written out as the recipe resolves it ('fusion'
        under DP-SGD, 'all' without), so each arm's saved config says what trained.
        """
        sections = arm.overrides()
        # what no site has (or the run config leaves out) is not built nor sent
        available = [
            m for m in sections["model"]["modalities"] if m not in self.missing
        ]
        if available:
            sections["model"]["modalities"] = available
        sections["output"] = {"dir": run_dir, "checkpoint_every": self.rounds}
        config = self.base_config(sites_dir, cell, seed, base_folder)
        config = config.with_overrides(**sections)
        scope = training_recipe(config).trainable
        return config.with_overrides(model={"trainable": scope.value})

    def recipes(self) -> dict[str, dict[str, Any]]:
        """The training recipe of the arms without DP and of those with DP-SGD."""
        cell = Cell(self.patients[0], self.site_counts[0], RANDOM_BASE)
        out = {}
        for name, private in (("no DP", False), ("DP-SGD", True)):
            config = self.base_config("sites", cell, 0).with_overrides(
                privacy={"enabled": private}
            )
            out[name] = {
                k: v.value if isinstance(v, StrEnum) else v
                for k, v in asdict(training_recipe(config)).items()
            }
        return out

    def data_key(self, patients: int) -> dict[str, Any]:
        """What decides the arms' data.

        Synthetic: what decides the hospitals (besides site count and seed).
        ``--sites-dir``: each site's dataset fingerprint and the run config.
        """
        if self.sites_dir is not None:
            config_text = Path(self.run_config).read_text() if self.run_config else ""
            return {
                "sites": self.data_identity,
                "run_config": hashlib.sha256(config_text.encode()).hexdigest(),
            }
        from ...synthetic.hospitals import GENERATOR_VERSION

        return {
            "generator": GENERATOR_VERSION,
            "patients_per_site": patients,
            "heterogeneity": self.heterogeneity.as_dict(),
        }

    def arm_key(
        self,
        arm: Arm,
        cell: Cell,
        seed: int,
        base_identity: dict[str, Any] | None = None,
    ) -> str:
        """A hash of everything that decides an arm's result.

        ``base_identity``: what identifies the cell's pretrained base (its
        pretrained layers' hash; the runner reads it). A cached result under
        another key is stale and is run again.
        """
        config = self.arm_config(arm, cell, "sites", seed, "run")
        arm_fields = asdict(arm)
        if not arm.personal:
            del arm_fields["personal"]  # absent when off: earlier results stay valid
        if not arm.own_model_weight:
            del arm_fields["own_model_weight"]
        federation: dict[str, Any] = {}
        if arm.kind is ArmKind.FEDERATED and not arm.classical:
            # the sites clip their deltas to it (the classical arm does not)
            federation["delta_clip_norm"] = config.federation.delta_clip_norm
        payload = {
            "arm": arm_fields,
            "data": self.data_key(cell.patients),
            "sites": cell.sites,
            "seed": seed,
            "base": base_label(cell.base),
            "base_identity": base_identity,
            "training": {
                k: getattr(self, k)
                for k in (
                    "rounds",
                    "local_epochs",
                    "batch_size",
                    "image_size",
                    "max_note_tokens",
                )
            },
            "recipe": asdict(training_recipe(config)),
            **({"federation": federation} if federation else {}),
            # the model as configured (the base is keyed above, by its identity)
            "model": config.model.model_dump(mode="json", exclude={"base"}),
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the study's output and docs)."""
        return {
            "size": self.size.value,
            "sites_dir": self.sites_dir,
            "run_config": self.run_config,
            "skipped_arms": self.skipped(),
            "unscored_sites": {
                a.name: found
                for a in self.arms
                if a.name not in self.skipped() and (found := self.unscored_sites(a))
            },
            "site_decimals": dict(self.site_decimals),
            "site_not_recorded": {
                k: list(v) for k, v in self.site_not_recorded.items()
            },
            "site_thin_labels": {
                site: {label: list(pn) for label, pn in labels.items()}
                for site, labels in self.site_thin_labels.items()
            },
            "require_image_from_run_config": self._run_config_sets_require_image(),
            "arms_left_out": {
                str(n): [a.name for a in left]
                for n in self.site_counts
                if (left := self.arms_left_out(n))
            },
            "site_counts": list(self.site_counts),
            "patients": list(self.patients),
            "seeds": {str(p): list(self.seeds_for(p)) for p in self.patients},
            "bases": [base_label(b) for b in self.bases],
            "primary_base": base_label(self.primary_base),
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "recipes": self.recipes(),
            "image_size": self.image_size,
            "max_note_tokens": self.max_note_tokens,
            "fedprox_mus": list(self.mus),
            "dp_epsilons": list(self.epsilons),
            "ablation_site_counts": list(self.ablation_site_counts),
            "dp_goal_patients": self.dp_goal_patients,
            "local_goal_patients": self.local_goal_patients,
            "heterogeneity": self.heterogeneity.as_dict(),
            "cells": {
                c.key: {
                    **c.as_dict(),
                    "seeds": list(self.seeds_for(c.patients)),
                    "arms": [a.name for a in self.arms_for(c)],
                }
                for c in self.cells()
            },
            "arms": {
                a.name: {"label": a.label, "kind": a.kind.value, "group": a.group.value}
                for a in self.arms
            },
        }
