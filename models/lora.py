"""The one place that turns a model config into PEFT LoRA adapters.

Every family names its target modules (and, for ``fusion``, the modules that
train in full); the rank, alpha, dropout, variant and initial seed come from the
model config here. The adapters' initial values are seeded from
``model.init-seed`` (+1, so they differ from the base's draw), so every site and
the coordinator start from the same adapter without sending it. FFA-LoRA freezes
every A factor at that shared initial value: only B and the modules to save train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..common.config import FamilyModelConfig, LoraVariant

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel


def lora_config(
    model_config: FamilyModelConfig,
    targets: Sequence[str],
    *,
    modules_to_save: Sequence[str] = (),
) -> LoraConfig:
    """PEFT's LoraConfig for ``targets`` with the run's rank, alpha and dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_config.lora_rank,
        lora_alpha=model_config.lora_alpha,  # type: ignore[arg-type]  # PEFT: int; a float scales as well
        lora_dropout=model_config.lora_dropout,
        target_modules=list(targets),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )


def add_lora(
    base: torch.nn.Module,
    model_config: FamilyModelConfig,
    targets: Sequence[str],
    *,
    modules_to_save: Sequence[str] = (),
    **peft_options: Any,
) -> PeftModel:
    """Wrap ``base`` in LoRA adapters, seeded; FFA-LoRA's A factors frozen.

    ``peft_options`` go to ``get_peft_model`` (the vlm family autocasts the
    adapters to float32 over a bfloat16 base). The global RNG is left as it was.
    """
    from peft import get_peft_model

    config = lora_config(model_config, targets, modules_to_save=modules_to_save)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(model_config.init_seed + 1)
    try:
        model: PeftModel = get_peft_model(base, config, **peft_options)
    finally:
        torch.random.set_rng_state(generator_state)
    if model_config.lora_variant is LoraVariant.FFA:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model
