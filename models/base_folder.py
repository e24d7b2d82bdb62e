"""A pretrained fusion base on disk: Hugging Face encoders plus the fusion layers.

Layout (``wardround pretrain`` writes it; ``model.base`` names it)::

    vision/                    ViTModel.save_pretrained (config.json, model.safetensors)
    text/                      BertModel.save_pretrained
    encoders.safetensors       the projections into the shared width and the EHR encoder
    wardround-base.json        what it was built from and for (shapes, corpus, settings)

The encoders load like any Hugging Face checkpoint (``from_pretrained``); the
shapes recorded in the manifest must match the run config, or loading stops with
a message that says how to rebuild the base for the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..common.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

MANIFEST = "wardround-base.json"
LAYERS_FILE = "encoders.safetensors"
VISION_DIR = "vision"
TEXT_DIR = "text"
PRETRAINED_LAYERS = ("vision_proj", "text_proj", "ehr_encoder")
"""Fusion-model layers a base carries besides the encoders (the fusion module and
the head are always fresh: they are the task's)."""
FORMAT_VERSION = 1


def hf_config(model: nn.Module) -> PretrainedConfig:
    """A Hugging Face model's ``config`` (``Module.__getattr__`` types it Tensor | Module)."""
    return cast("PretrainedConfig", model.config)


def base_shapes(config: Any) -> dict[str, Any]:
    """What a base must agree with to fit a run config (``RunConfig``)."""
    mc, task = config.model, config.task
    return {
        "image_size": mc.image_size,
        "image_channels": task.image_channels,
        "hidden_size": mc.hidden_size,
        "tokenizer": mc.tokenizer,
        "max_note_tokens": mc.max_note_tokens,
        "ehr_width": task.ehr_width,
        "ehr_features": [*task.numeric, *task.categorical],
    }


def save_base(model: nn.Module, folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``model``'s encoders and pretrained layers, and the manifest, to ``folder``."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers
    folder.mkdir(parents=True, exist_ok=True)
    # The fusion model's encoders are Hugging Face models (Module.__getattr__ types
    # them Tensor | Module).
    if model.vision_encoder is not None:
        cast("PreTrainedModel", model.vision_encoder).save_pretrained(
            folder / VISION_DIR
        )
    if model.text_encoder is not None:
        cast("PreTrainedModel", model.text_encoder).save_pretrained(folder / TEXT_DIR)
    layers = {k: t.detach().cpu().contiguous() for k, t in layer_tensors(model).items()}
    save_file(layers, str(folder / LAYERS_FILE))
    body = {"format": FORMAT_VERSION, **manifest}
    (folder / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the base in ``folder``, or ConfigError saying what is wrong."""
    path = folder / MANIFEST
    hint = (
        "model.base names a folder written by `wardround pretrain` (or 'pretrained' "
        "for the public synthetic base, or 'random')."
    )
    if not path.is_file():
        raise ConfigError(f"{folder} is not a wardround base: no {MANIFEST}", hint=hint)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}", hint=hint) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} is not a base manifest of format {FORMAT_VERSION}", hint=hint
        )
    return manifest


def check_fits(folder: Path, manifest: dict[str, Any], config: Any) -> None:
    """ConfigError unless the base in ``folder`` was built for the run's shapes."""
    wanted, built = base_shapes(config), manifest.get("shapes", {})
    differ = [
        f"{key}: base {built.get(key)!r}, run {value!r}"
        for key, value in wanted.items()
        if built.get(key) != value
    ]
    if differ:
        raise ConfigError(
            f"the base in {folder} was built for other shapes than this run's: "
            + "; ".join(differ),
            hint="Rebuild it for this run (`wardround pretrain --config RUN.toml "
            "--out FOLDER`), or set model.base = 'random'.",
        )


def layers_sha256(folder: Path) -> str:
    """sha256 of the base's pretrained-layer file (part of the base fingerprint)."""
    import hashlib

    return hashlib.sha256((folder / LAYERS_FILE).read_bytes()).hexdigest()


def load_pretrained_layers(
    model: nn.Module, folder: Path, *, skip: tuple[str, ...] = ()
) -> None:
    """Load the projections and the EHR encoder a base carries into ``model``.

    ``skip`` names layers that stay fresh (a projection whose encoder is not the
    base's own).
    """
    from safetensors.torch import load_file

    path = folder / LAYERS_FILE
    if not path.is_file():
        raise ConfigError(
            f"the base in {folder} has no {LAYERS_FILE}",
            hint="Rebuild it with `wardround pretrain`.",
        )
    tensors = load_file(str(path))
    for name in PRETRAINED_LAYERS:
        layer = getattr(model, name)
        if layer is None or name in skip:
            continue
        own = {
            k[len(name) + 1 :]: v
            for k, v in tensors.items()
            if k.startswith(name + ".")
        }
        if not own:
            continue  # the base was built without this modality
        try:
            layer.load_state_dict(own)
        except RuntimeError as exc:
            raise ConfigError(
                f"the base in {folder} does not fit this run's {name}: {exc}",
                hint="Rebuild it for this run with `wardround pretrain`.",
            ) from None


def encoder_folder(folder: Path, which: str) -> Path:
    """Where the base keeps its ``vision`` or ``text`` encoder."""
    return folder / (VISION_DIR if which == "vision" else TEXT_DIR)


def layer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained layers' tensors of ``model`` by name (what a base saves)."""
    return {
        f"{name}.{key}": tensor
        for name in PRETRAINED_LAYERS
        if getattr(model, name) is not None
        for key, tensor in getattr(model, name).state_dict().items()
    }
