"""The ``vlm`` family: Hugging Face image-text-to-text models with LoRA adapters.

Any model ``AutoModelForImageTextToText`` loads (LLaVA and LLaVA-Med-style
models, PaliGemma, Gemma 3, Idefics3/SmolVLM, Qwen2-VL, ...) from a local folder
or a hub id in the local cache (``model.path``), or a tiny random one of a known
architecture (``model.tiny-arch``, :mod:`.vlm_tiny`). Its processor comes with it.

LoRA goes on every linear layer of the parts named in ``model.lora-towers``
(vision tower, projector, language model); which module belongs to which part is
read from the architecture's module names (:data:`TOWER_PREFIXES`). The frozen
base may be bfloat16 (``model.dtype``); the LoRA factors stay float32, so what
crosses the wire and what is averaged is the same on every site.

DP-SGD needs per-sample gradients, which Opacus computes layer by layer from
activations whose first dimension is the batch. Qwen2-VL's vision tower (and its
merger) packs every image of a batch into one sequence, so no layer there sees a
batch dimension: DP runs refuse LoRA on it (:func:`check_dp_targets`).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..common.config import ModelDtype, RunConfig, VlmModelConfig, VlmTower
from ..common.errors import ConfigError
from .base_folder import hf_config
from .lora import add_lora
from .registry import BuiltModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LLAVA_LIKE: dict[VlmTower, tuple[str, ...]] = {
    VlmTower.PROJECTOR: ("model.multi_modal_projector.",),
    VlmTower.VISION: ("model.vision_tower.",),
    VlmTower.TEXT: ("model.language_model.",),
}
_IDEFICS_LIKE: dict[VlmTower, tuple[str, ...]] = {
    VlmTower.PROJECTOR: ("model.connector.",),
    VlmTower.VISION: ("model.vision_model.",),
    VlmTower.TEXT: ("model.text_model.",),
}
_QWEN_VL: dict[VlmTower, tuple[str, ...]] = {
    VlmTower.PROJECTOR: ("model.visual.merger.",),
    VlmTower.VISION: ("model.visual.",),
    VlmTower.TEXT: ("model.language_model.",),
}
TOWER_PREFIXES: dict[str, dict[VlmTower, tuple[str, ...]]] = {
    "llava": _LLAVA_LIKE,
    "llava_next": _LLAVA_LIKE,
    "llava_onevision": _LLAVA_LIKE,
    "vipllava": _LLAVA_LIKE,
    "paligemma": _LLAVA_LIKE,
    "gemma3": _LLAVA_LIKE,
    "idefics3": _IDEFICS_LIKE,
    "smolvlm": _IDEFICS_LIKE,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
}
"""Module-name prefixes of each part, per ``config.model_type`` (checked in this
order: the projector first, since Qwen2-VL's merger sits inside its vision tower)."""

_FALLBACK_WORDS = {
    VlmTower.PROJECTOR: ("projector", "connector", "merger"),
    VlmTower.VISION: ("vision", "visual", "image_tower"),
    VlmTower.TEXT: ("language_model", "text_model"),
}
"""Words that place a module of an architecture not in :data:`TOWER_PREFIXES`."""

PACKED_VISION = frozenset({"qwen2_vl", "qwen2_5_vl"})
"""Architectures whose vision tower packs a batch's images into one sequence."""
PACKABLE_TEXT = frozenset({"llava", "idefics3", "smolvlm"})
"""Architectures whose examples can share a row (``model.pack-sequences``): causal
text attention and images placed by token, so per-example positions suffice."""


def tower_of(module_name: str, model_type: str) -> VlmTower | None:
    """The part a module belongs to (None: outside the towers, e.g. ``lm_head``)."""
    prefixes = TOWER_PREFIXES.get(model_type)
    for tower in (VlmTower.PROJECTOR, VlmTower.VISION, VlmTower.TEXT):
        if prefixes is not None:
            if module_name.startswith(prefixes[tower]):
                return tower
        elif any(word in module_name for word in _FALLBACK_WORDS[tower]):
            return tower
    return None


def lora_targets(model: nn.Module, towers: tuple[VlmTower, ...]) -> list[str]:
    """Every linear layer of the chosen towers (full module names, sorted)."""
    model_type = hf_config(model).model_type
    wanted: tuple[VlmTower | None, ...] = towers  # tower_of may answer None
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and tower_of(name, model_type) in wanted
    )


def check_dp_targets(model_type: str, towers: tuple[VlmTower, ...]) -> None:
    """Refuse LoRA targets Opacus cannot give per-sample gradients for."""
    blocked = [t for t in towers if t is not VlmTower.TEXT]
    if model_type in PACKED_VISION and blocked:
        raise ConfigError(
            f"DP-SGD cannot train LoRA on the {' and '.join(t.value for t in blocked)} "
            f"of a {model_type} model: its vision tower packs all images of a batch "
            "into one sequence, so Opacus has no per-example gradient there",
            hint='Set model.lora-towers = ["text"] (LoRA on the language model; the '
            "vision tower stays frozen), or train without DP-SGD.",
        )


def resolve_dtype(choice: ModelDtype) -> torch.dtype:
    """``auto``: bfloat16 where a CUDA device supports it, else float32."""
    if choice is ModelDtype.BFLOAT16:
        return torch.bfloat16
    if choice is ModelDtype.AUTO and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    return torch.float32


def load_vlm(config: RunConfig) -> tuple[nn.Module, Any]:
    """The base model (frozen, eval mode) and its processor."""
    mc = VlmModelConfig.of(config)
    dtype = resolve_dtype(mc.dtype)
    if mc.tiny_arch:
        from .vlm_tiny import build_tiny_vlm

        model, processor = build_tiny_vlm(mc.tiny_arch, seed=mc.init_seed)
        model = model.to(dtype)
    else:
        from transformers import AutoModelForImageTextToText

        from .vlm_processor import load_processor

        try:
            model = AutoModelForImageTextToText.from_pretrained(mc.path, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"cannot load the vision-language model {mc.path!r}: {exc}",
                hint="Give a local folder written by save_pretrained, or a hub id that "
                "is in the local Hugging Face cache (model.path).",
            ) from None
        processor = load_processor(mc.path)
    model.requires_grad_(False)
    return model.eval(), processor


def base_fingerprint(model: nn.Module, processor: Any) -> str:
    """sha256 over the base weights, the model config and the prompt format.

    Weights are hashed at bfloat16 precision, so a site that loads the base in
    bfloat16 and a coordinator that loads it in float32 agree. The chat template
    and vocabulary count too: sites that prompt differently train different tasks.
    """
    settings = hf_config(model).to_dict()
    for volatile in (
        "_name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
    ):
        settings.pop(volatile, None)
    tokenizer = processor.tokenizer
    digest = hashlib.sha256(
        json.dumps(
            {
                "family": "vlm",
                "config": settings,
                "vocabulary": len(tokenizer),
                "chat_template": getattr(processor, "chat_template", None),
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        value = tensor.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(torch.bfloat16).view(torch.int16)
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_base(config: RunConfig) -> tuple[nn.Module, str]:
    """The bare base model and its fingerprint (for ``PeftModel.from_pretrained``)."""
    model, processor = load_vlm(config)
    return model, base_fingerprint(model, processor)


def build_vlm(config: RunConfig) -> BuiltModel:
    """The LoRA-wrapped vision-language model, with its processor."""
    mc = VlmModelConfig.of(config)
    base, processor = load_vlm(config)
    model_type = hf_config(base).model_type
    if config.privacy.enabled:
        check_dp_targets(model_type, mc.lora_towers)
    if mc.pack_sequences and model_type not in PACKABLE_TEXT:
        raise ConfigError(
            f"model.pack-sequences is not supported for {model_type} models",
            hint="Packing needs causal attention over plain positions; supported: "
            f"{', '.join(sorted(PACKABLE_TEXT))}. Set model.pack-sequences = false.",
        )
    fingerprint = base_fingerprint(base, processor)
    targets = lora_targets(base, mc.lora_towers)
    if not targets:
        raise ConfigError(
            f"no linear layer of {model_type} belongs to model.lora-towers "
            f"{[t.value for t in mc.lora_towers]}",
            hint="Name other towers (vision, projector, text).",
        )
    model = add_lora(base, mc, targets, autocast_adapter_dtype=True)
    if mc.gradient_checkpointing:
        # a Hugging Face model (Module.__getattr__ types the method Tensor | Module)
        cast("PreTrainedModel", base).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return BuiltModel(
        model=model, base_fingerprint=fingerprint, family="vlm", processor=processor
    )
