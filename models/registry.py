"""The model families: for each, its config class, model builder, objective and data loader.

A family turns a :class:`~wardround.common.config.RunConfig` into a base model plus
its LoRA adapters (a PEFT model), says what local training optimises (its
objective) and how a site's data becomes its examples (its data loader). Code that
depends on the family asks :func:`family_of` instead of comparing
``model.family`` as a string.

Builders, objectives and data loaders are named as ``module:attribute`` and
imported on first use, as Python's entry points are: the ``vlm`` family pulls in
transformers' multimodal models, and the objective and data loader are site code
(``wardround.client``) that the coordinator never asks for, so ``common``
imports nothing from ``client``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..common.config import FusionModelConfig, VlmModelConfig
from ..common.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..common.config import FamilyModelConfig, RunConfig


@dataclass
class BuiltModel:
    """A PEFT-wrapped model and what the federation needs to know about it."""

    model: torch.nn.Module
    """The PEFT model (``PeftModel``) whose trainable tensors are the adapter."""
    base_fingerprint: str
    """sha256 over the frozen base weights and the base config."""
    family: str
    processor: Any = None
    """What turns raw inputs into model inputs, when the family has one (``vlm``:
    the Hugging Face processor that tokenises prompts and prepares images)."""
    initial_adapter: Any = None
    """The adapter as built from the run config (a name → numpy array mapping),
    for a site's own model to start from: nothing a coordinator sent is in it.
    Kept by the site for classifier families only (``client.runtime``)."""


@dataclass(frozen=True)
class ModelFamily:
    """One model family and where its parts live (``module:attribute``)."""

    name: str
    config: type[FamilyModelConfig]
    """Its ``[model]`` section (a member of the discriminated union)."""
    builder: str
    """``(RunConfig) -> BuiltModel``: the LoRA-wrapped model."""
    base_builder: str
    """``(RunConfig) -> (base model, fingerprint)``: the bare base, no adapters."""
    objective: str
    """``(RunConfig, BuiltModel) -> Objective``: what local training optimises."""
    data_loader: str
    """``(SiteConfig, TaskConfig, RunConfig, BuiltModel) -> site data``."""

    def build(self, config: RunConfig) -> BuiltModel:
        """The family's PEFT model for ``config``."""
        built: BuiltModel = _resolve(self.builder)(config)
        return built

    def build_base(self, config: RunConfig) -> tuple[torch.nn.Module, str]:
        """The bare base model and its fingerprint."""
        base: tuple[torch.nn.Module, str] = _resolve(self.base_builder)(config)
        return base

    def make_objective(self, config: RunConfig, built: BuiltModel) -> Any:
        """The site's objective (``client.objectives.Objective``)."""
        return _resolve(self.objective)(config, built)

    def load_data(
        self, site: Any, task: Any, config: RunConfig, built: BuiltModel
    ) -> Any:
        """A site's examples for this family (``site``: ``client.SiteConfig``)."""
        return _resolve(self.data_loader)(site, task, config, built)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (its config class must be in ``common.config.ModelConfig``)."""
    FAMILIES[family.name] = family
    return family


register_family(
    ModelFamily(
        name="fusion",
        config=FusionModelConfig,
        builder="wardround.models.fusion:build_fusion",
        base_builder="wardround.models.fusion:build_base",
        objective="wardround.client.objectives:FusionObjective.for_run",
        data_loader="wardround.sitedata.dataset:load_site_data_for_run",
    )
)
register_family(
    ModelFamily(
        name="vlm",
        config=VlmModelConfig,
        builder="wardround.models.vlm:build_vlm",
        base_builder="wardround.models.vlm:build_base",
        objective="wardround.client.vlm_objective:VlmObjective.for_run",
        data_loader="wardround.sitedata.vlm_dataset:load_vlm_site_data_for_run",
    )
)


def _resolve(reference: str) -> Any:
    module, _, attributes = reference.partition(":")
    target: Any = importlib.import_module(module)
    for name in attributes.split("."):
        target = getattr(target, name)
    return target


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model family {name!r}",
            hint=f"Set model.family to one of: {', '.join(sorted(FAMILIES))}.",
        ) from None


def family_of(config: RunConfig) -> ModelFamily:
    """The family of ``config``'s model."""
    return get_family(config.model.family)


def build_base_model(config: RunConfig) -> tuple[torch.nn.Module, str]:
    """Build the bare base model (no adapters) and its fingerprint.

    For ``PeftModel.from_pretrained(base, run_dir / "adapter")``.
    """
    return family_of(config).build_base(config)


def build_model(config: RunConfig) -> BuiltModel:
    """Build the configured family's PEFT model (deterministic for a config)."""
    return family_of(config).build(config)


def describe(built: BuiltModel) -> dict[str, Any]:
    """Parameter counts and bytes for reports."""
    named = list(built.model.named_parameters())
    # PEFT keeps a frozen original next to each trainable copy of a module to save:
    # count the base model once, as it would be shipped.
    base = sum(
        p.numel() for n, p in named if "lora_" not in n and ".modules_to_save." not in n
    )
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    return {
        "family": built.family,
        "base_parameters": base,
        "trainable_parameters": trainable,
        "base_model_bytes_float32": base * 4,
        "adapter_bytes_float32": trainable * 4,
        "adapter_to_base_ratio": trainable / base if base else float("nan"),
    }
