"""What the learning-quality study runs: its arms and its sizes (pure, no torch).

An *arm* is one way of training: pooled (centralised) training on the union of the
sites' training data, local-only training at each site, or a federation (FedAvg,
FedProx, with or without DP-SGD and SecAgg+, on some modalities with some fusion).
Every arm of a study sees the same synthetic hospitals, the same seeds and the same
number of training examples (``rounds × local-epochs`` passes over each site's
training split), and is evaluated on the same per-site validation split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ...common.config import (
    ALL_MODALITIES,
    Fusion,
    Modality,
    RunConfig,
    Strategy,
)
from ...common.errors import ConfigError
from ...common.secagg_math import MIN_PARTICIPANTS
from ..synth_shift import STUDY_HETEROGENEITY, Heterogeneity


class ArmKind(StrEnum):
    """How an arm trains."""

    POOLED = "pooled"
    LOCAL = "local"
    FEDERATED = "federated"


class ArmGroup(StrEnum):
    """Which question an arm answers (the report's sections)."""

    REFERENCE = "reference"
    STRATEGY = "strategy"
    PRIVACY = "privacy"
    SECURE_AGGREGATION = "secure aggregation"
    MODALITY = "modality"


class StudySize(StrEnum):
    """``smoke``: seconds, for tests and CI; ``full``: the published figures."""

    SMOKE = "smoke"
    FULL = "full"


@dataclass(frozen=True)
class Arm:
    """One way of training, applied to every federation and seed of the study."""

    name: str
    """Identifier: file names, JSON keys."""
    label: str
    """What the report calls it."""
    kind: ArmKind
    group: ArmGroup
    strategy: Strategy = Strategy.FEDAVG
    proximal_mu: float = 0.0
    epsilon: float | None = None
    """Target epsilon of DP-SGD at every site (delta from the run config); None: no DP."""
    secure_aggregation: bool = False
    modalities: tuple[Modality, ...] = ALL_MODALITIES
    fusion: Fusion = Fusion.CONCAT
    subgroups: bool = False
    """Also report AUROC by sex, age band and site for this arm's final model."""

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The run-config sections this arm sets (on top of the study's base config)."""
        return {
            "federation": {
                "strategy": self.strategy.value,
                "proximal_mu": self.proximal_mu,
            },
            "model": {
                "modalities": [m.value for m in self.modalities],
                "fusion": self.fusion.value,
            },
            "privacy": {
                "enabled": self.epsilon is not None,
                "target_epsilon": self.epsilon if self.epsilon is not None else 8.0,
            },
            "secure_aggregation": {"enabled": self.secure_aggregation},
        }


def standard_arms(
    mus: tuple[float, ...], epsilons: tuple[float, ...]
) -> tuple[Arm, ...]:
    """Pooled, local-only, FedAvg, FedProx per mu, SecAgg+, DP per epsilon, ablations."""
    federated = ArmKind.FEDERATED
    arms = [
        Arm(
            "pooled",
            "pooled (centralised)",
            ArmKind.POOLED,
            ArmGroup.REFERENCE,
            subgroups=True,
        ),
        Arm("local", "local only", ArmKind.LOCAL, ArmGroup.REFERENCE),
        Arm("fedavg", "FedAvg", federated, ArmGroup.STRATEGY, subgroups=True),
    ]
    arms += [
        Arm(
            f"fedprox-mu{mu:g}",
            f"FedProx μ={mu:g}",
            federated,
            ArmGroup.STRATEGY,
            strategy=Strategy.FEDPROX,
            proximal_mu=mu,
        )
        for mu in mus
    ]
    arms.append(
        Arm(
            "fedavg-secagg",
            "FedAvg + SecAgg+",
            federated,
            ArmGroup.SECURE_AGGREGATION,
            secure_aggregation=True,
        )
    )
    arms += [
        Arm(
            f"fedavg-dp-eps{eps:g}",
            f"FedAvg + DP ε={eps:g}",
            federated,
            ArmGroup.PRIVACY,
            epsilon=eps,
        )
        for eps in epsilons
    ]
    if epsilons:
        top = max(epsilons)
        # wardround's default deployment: DP-SGD and SecAgg+ together
        arms.append(
            Arm(
                f"fedavg-dp-eps{top:g}-secagg",
                f"FedAvg + DP ε={top:g} + SecAgg+",
                federated,
                ArmGroup.SECURE_AGGREGATION,
                epsilon=top,
                secure_aggregation=True,
            )
        )
    arms += [
        Arm(
            f"fedavg-{m.value}-only",
            f"FedAvg, {m.value} only",
            federated,
            ArmGroup.MODALITY,
            modalities=(m,),
        )
        for m in ALL_MODALITIES
    ]
    arms += [
        Arm(
            f"fedavg-{fusion.value}",
            f"FedAvg, fused ({fusion.value})",
            federated,
            ArmGroup.MODALITY,
            fusion=fusion,
        )
        for fusion in Fusion
        if fusion is not Fusion.CONCAT
    ]
    return tuple(arms)


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides a study's numbers, parsed once from the CLI."""

    size: StudySize
    site_counts: tuple[int, ...]
    seeds: tuple[int, ...]
    patients_per_site: int
    rounds: int
    local_epochs: int
    batch_size: int
    image_size: int
    max_note_tokens: int
    mus: tuple[float, ...]
    epsilons: tuple[float, ...]
    ablation_site_counts: tuple[int, ...]
    """Site counts that run every arm; the others run the reference and strategy
    arms only (pooled, local-only, FedAvg, FedProx)."""
    heterogeneity: Heterogeneity = STUDY_HETEROGENEITY
    arms: tuple[Arm, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.arms:
            object.__setattr__(self, "arms", standard_arms(self.mus, self.epsilons))
        problems = []
        if not self.site_counts or min(self.site_counts) < 2:
            problems.append("--sites needs counts of at least 2 (a federation)")
        if not self.seeds:
            problems.append("--seeds must be at least 1")
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
        seeds: int | None = None,
    ) -> StudySettings:
        """The preset of ``size``, with the site counts and seed count overridden."""
        preset = _PRESETS[StudySize(size)]
        counts = tuple(site_counts) if site_counts else preset["site_counts"]
        values = {
            **preset,
            "site_counts": counts,
            "seeds": tuple(range(seeds)) if seeds is not None else preset["seeds"],
            "ablation_site_counts": tuple(
                c for c in counts if c in preset["ablation_site_counts"]
            )
            or counts[:1],
        }
        return cls(size=StudySize(size), **values)

    def arms_for(self, n_sites: int) -> tuple[Arm, ...]:
        """The arms run on the federation of ``n_sites`` sites.

        SecAgg+ arms need at least 3 sites (sites refuse it among fewer): a
        federation of 2 runs without them (:meth:`arms_left_out`).
        """
        arms = self.arms
        if n_sites < MIN_PARTICIPANTS:
            arms = tuple(a for a in arms if not a.secure_aggregation)
        if n_sites in self.ablation_site_counts:
            return arms
        core = (ArmGroup.REFERENCE, ArmGroup.STRATEGY)
        return tuple(a for a in arms if a.group in core)

    def arms_left_out(self, n_sites: int) -> tuple[Arm, ...]:
        """The SecAgg+ arms a federation of fewer than 3 sites cannot run."""
        if n_sites >= MIN_PARTICIPANTS:
            return ()
        return tuple(a for a in self.arms if a.secure_aggregation)

    def base_config(self, sites_dir: str, n_sites: int, seed: int) -> RunConfig:
        """The run config every arm of one federation and seed starts from.

        Secure aggregation is off here; each arm says whether it uses it.
        """
        return RunConfig().with_overrides(
            federation={"rounds": self.rounds, "min_sites": n_sites, "seed": seed},
            secure_aggregation={"enabled": False},
            train={
                "local_epochs": self.local_epochs,
                "batch_size": self.batch_size,
                "torch_threads": 1,
            },
            model={
                "image_size": self.image_size,
                "max_note_tokens": self.max_note_tokens,
                "init_seed": seed,
            },
            data={"sites_dir": sites_dir},
            output={"checkpoint_every": self.rounds},
        )

    def arm_config(
        self, arm: Arm, sites_dir: str, n_sites: int, seed: int, run_dir: str
    ) -> RunConfig:
        """The run config of ``arm`` on one federation and seed."""
        sections = arm.overrides()
        sections["output"] = {"dir": run_dir, "checkpoint_every": self.rounds}
        return self.base_config(sites_dir, n_sites, seed).with_overrides(**sections)

    def data_key(self) -> dict[str, Any]:
        """What decides the synthetic hospitals (besides site count and seed)."""
        return {
            "patients_per_site": self.patients_per_site,
            "heterogeneity": self.heterogeneity.as_dict(),
        }

    def arm_key(self, arm: Arm, n_sites: int, seed: int) -> str:
        """A hash of everything that decides an arm's result.

        A cached result under another key is stale and is run again.
        """
        payload = {
            "arm": asdict(arm),
            "data": self.data_key(),
            "sites": n_sites,
            "seed": seed,
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
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the study's output and docs)."""
        return {
            "size": self.size.value,
            "site_counts": list(self.site_counts),
            "seeds": list(self.seeds),
            "patients_per_site": self.patients_per_site,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "max_note_tokens": self.max_note_tokens,
            "fedprox_mus": list(self.mus),
            "dp_epsilons": list(self.epsilons),
            "ablation_site_counts": list(self.ablation_site_counts),
            "heterogeneity": self.heterogeneity.as_dict(),
            "arms": {
                a.name: {"label": a.label, "kind": a.kind.value, "group": a.group.value}
                for a in self.arms
            },
        }


_PRESETS: dict[StudySize, dict[str, Any]] = {
    StudySize.SMOKE: {
        "site_counts": (3,),
        "seeds": (0,),
        "patients_per_site": 40,
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "max_note_tokens": 32,
        "mus": (0.1,),
        "epsilons": (8.0,),
        "ablation_site_counts": (3,),
    },
    StudySize.FULL: {
        "site_counts": (3, 8),
        "seeds": (0, 1, 2),
        "patients_per_site": 200,
        "rounds": 5,
        "local_epochs": 2,
        "batch_size": 16,
        "image_size": 64,
        "max_note_tokens": 128,
        "mus": (0.01, 0.1, 1.0),
        "epsilons": (1.0, 3.0, 8.0),
        "ablation_site_counts": (3,),
    },
}
