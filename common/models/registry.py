"""A registry of model families.

A family turns a :class:`~wardround.common.config.RunConfig` into a base model plus
its LoRA adapters (a PEFT model) and names the tensors that train. New families
(e.g. generative VLMs) register here without touching the federation code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig


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


FamilyBuilder = Callable[["RunConfig"], BuiltModel]
BaseBuilder = Callable[["RunConfig"], "tuple[torch.nn.Module, str]"]
_FAMILIES: dict[str, FamilyBuilder] = {}
_BASES: dict[str, BaseBuilder] = {}
_BUILT_IN = {"fusion": "fusion", "vlm": "vlm"}
"""Built-in family -> its module here (imported on first use: the ``vlm`` family
pulls in transformers' multimodal models)."""


def register_family(
    name: str, *, base: BaseBuilder
) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Register a family (decorator on its PEFT builder); ``base`` builds the bare base model."""

    def decorate(builder: FamilyBuilder) -> FamilyBuilder:
        _FAMILIES[name] = builder
        _BASES[name] = base
        return builder

    return decorate


def get_family(name: str) -> FamilyBuilder:
    """Return the builder of a family, importing the built-in ones lazily."""
    if name not in _FAMILIES and name in _BUILT_IN:
        importlib.import_module(f"{__package__}.{_BUILT_IN[name]}")  # registers itself
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(set(_FAMILIES) | set(_BUILT_IN)))
        raise ConfigError(
            f"unknown model family {name!r}",
            hint=f"Set model.family to one of: {known}.",
        ) from None


def build_base_model(config: RunConfig) -> tuple[torch.nn.Module, str]:
    """Build the bare base model (no adapters) and its fingerprint.

    For ``PeftModel.from_pretrained(base, run_dir / "adapter")``.
    """
    get_family(config.model.family)
    return _BASES[config.model.family](config)


def build_model(config: RunConfig) -> BuiltModel:
    """Build the configured family's PEFT model (deterministic for a config).

    FFA-LoRA freezes every LoRA A factor at its (seeded, shared) initial value, so
    only B and the modules to save train.
    """
    from ..config import LoraVariant

    built = get_family(config.model.family)(config)
    if config.model.lora_variant is LoraVariant.FFA:
        for name, param in built.model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return built


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
