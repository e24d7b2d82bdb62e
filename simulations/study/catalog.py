"""The study's arms: every way of training it compares (pure, no torch).

An *arm* is one way of training: pooled (centralised) training on the union of the
sites' training data, local-only training at each site, or a federation (FedAvg,
FedProx, with or without DP-SGD and SecAgg+, on some modalities with some fusion),
of the fusion model or of the classical reference. Which arms run in which cell is
:class:`~.plan.StudySettings`' business.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ...common.config import ALL_MODALITIES, Fusion, Modality, Strategy


class ArmKind(StrEnum):
    """How an arm trains."""

    POOLED = "pooled"
    LOCAL = "local"
    FEDERATED = "federated"


class ArmGroup(StrEnum):
    """Which question an arm answers (the report's sections)."""

    REFERENCE = "reference"
    CLASSICAL = "classical reference"
    STRATEGY = "strategy"
    PRIVACY = "privacy"
    SECURE_AGGREGATION = "secure aggregation"
    MODALITY = "modality"


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
    classical: bool = False
    """The classical reference (logistic regression on hashed note n-grams and the
    EHR, :mod:`.classical`) instead of the fusion model."""
    personal: tuple[str, ...] = ()
    """Modules each site keeps to itself (``federation.personal``)."""
    own_model_weight: float = 0.0
    """Each site mixes a model of its own into its evaluation at this share
    (``federation.own-model-weight``; 0: not)."""

    @property
    def personalised(self) -> bool:
        """Whether each site evaluates a model of its own."""
        return bool(self.personal) or self.own_model_weight > 0

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The run-config sections this arm sets (on top of the study's base config)."""
        return {
            "federation": {
                "strategy": self.strategy.value,
                "proximal_mu": self.proximal_mu,
                "personal": list(self.personal),
                "own_model_weight": self.own_model_weight,
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

    @property
    def privacy_axis(self) -> bool:
        """Pooled, local-only, FedAvg and FedAvg + DP (neural and classical)."""
        return (
            self.group in (ArmGroup.REFERENCE, ArmGroup.CLASSICAL, ArmGroup.PRIVACY)
            or self.name == "fedavg"
        )

    @property
    def every_cell(self) -> bool:
        """The arms every cell runs: the privacy axis and the personalised arms.

        Personalisation is judged site by site, and at the smallest size a site's
        validation split holds a few dozen studies: the larger sizes are where its
        per-site margins can be read.
        """
        return self.privacy_axis or self.personalised


def standard_arms(
    mus: tuple[float, ...], epsilons: tuple[float, ...]
) -> tuple[Arm, ...]:
    """Pooled, local-only, FedAvg, FedProx per mu, SecAgg+, DP per epsilon, ablations."""
    return (
        *reference_arms(),
        *classical_arms(epsilons),
        *strategy_arms(mus),
        *secure_and_private_arms(epsilons),
        *modality_arms(),
    )


def reference_arms() -> tuple[Arm, ...]:
    """Pooled (centralised) and local-only training: the bounds federations sit between."""
    return (
        Arm(
            "pooled",
            "pooled (centralised)",
            ArmKind.POOLED,
            ArmGroup.REFERENCE,
            subgroups=True,
        ),
        Arm("local", "local only", ArmKind.LOCAL, ArmGroup.REFERENCE),
    )


def strategy_arms(mus: tuple[float, ...]) -> tuple[Arm, ...]:
    """FedAvg, FedProx per mu and personalised FedAvg, without DP or SecAgg+."""
    federated = ArmKind.FEDERATED
    return (
        Arm("fedavg", "FedAvg", federated, ArmGroup.STRATEGY, subgroups=True),
        *(
            Arm(
                f"fedprox-mu{mu:g}",
                f"FedProx μ={mu:g}",
                federated,
                ArmGroup.STRATEGY,
                strategy=Strategy.FEDPROX,
                proximal_mu=mu,
            )
            for mu in mus
        ),
        Arm(
            "fedavg-personal",
            "FedAvg, personalised (own head + wide term)",
            federated,
            ArmGroup.STRATEGY,
            personal=PERSONAL_MODULES,
        ),
        Arm(
            "fedavg-personal-lora-b",
            "FedAvg, personalised (own LoRA B, FedSA-LoRA)",
            federated,
            ArmGroup.STRATEGY,
            personal=PERSONAL_LORA,
        ),
        Arm(
            "fedavg-own-model",
            "FedAvg, personalised (own model, outputs mixed)",
            federated,
            ArmGroup.STRATEGY,
            own_model_weight=OWN_MODEL_WEIGHT,
        ),
    )


def secure_and_private_arms(epsilons: tuple[float, ...]) -> tuple[Arm, ...]:
    """FedAvg under SecAgg+, under DP-SGD per epsilon, and under both at the top one."""
    federated = ArmKind.FEDERATED
    arms = [
        Arm(
            "fedavg-secagg",
            "FedAvg + SecAgg+",
            federated,
            ArmGroup.SECURE_AGGREGATION,
            secure_aggregation=True,
        ),
        *(
            Arm(
                f"fedavg-dp-eps{eps:g}",
                f"FedAvg + DP ε={eps:g}",
                federated,
                ArmGroup.PRIVACY,
                epsilon=eps,
            )
            for eps in epsilons
        ),
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
    return tuple(arms)


def modality_arms() -> tuple[Arm, ...]:
    """FedAvg on each modality alone, and with each fusion other than concat."""
    federated = ArmKind.FEDERATED
    singles = (
        Arm(
            f"fedavg-{m.value}-only",
            f"FedAvg, {m.value} only",
            federated,
            ArmGroup.MODALITY,
            modalities=(m,),
        )
        for m in ALL_MODALITIES
    )
    fusions = (
        Arm(
            f"fedavg-{fusion.value}",
            f"FedAvg, fused ({fusion.value})",
            federated,
            ArmGroup.MODALITY,
            fusion=fusion,
        )
        for fusion in Fusion
        if fusion is not Fusion.CONCAT
    )
    return (*singles, *fusions)


PERSONAL_MODULES = ("head", "wide")
"""What the personalised arm keeps at each site: the head and the wide term read the
site's own label mix and note dialect; encoders and fusion layers are federated."""
PERSONAL_LORA = ("lora_B",)
"""What the FedSA-LoRA arm keeps at each site: every LoRA B factor (the A factors,
the head and the wide term are federated), after Guo et al., "Selective Aggregation
for Low-Rank Adaptation in Federated Learning" (ICLR 2025): A learns what the sites
share, B what is each site's own."""


OWN_MODEL_WEIGHT = 0.5
"""The share of each site's own model in the mixture it evaluates with: equal to
the global model's, a share no site's data chose."""


def classical_arms(epsilons: tuple[float, ...]) -> tuple[Arm, ...]:
    """The classical reference pooled, local only, FedAvg, and FedAvg + DP per ε."""
    group = ArmGroup.CLASSICAL
    arms = [
        Arm(
            "classical-pooled",
            "classical, pooled",
            ArmKind.POOLED,
            group,
            classical=True,
        ),
        Arm(
            "classical-local",
            "classical, local only",
            ArmKind.LOCAL,
            group,
            classical=True,
        ),
        Arm(
            "classical-fedavg",
            "classical, FedAvg",
            ArmKind.FEDERATED,
            group,
            classical=True,
        ),
    ]
    arms += [
        Arm(
            f"classical-fedavg-dp-eps{eps:g}",
            f"classical, FedAvg + DP ε={eps:g}",
            ArmKind.FEDERATED,
            group,
            epsilon=eps,
            classical=True,
        )
        for eps in epsilons
    ]
    return tuple(arms)
