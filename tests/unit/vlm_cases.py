"""What the vlm test files share: the tiny architectures, an example, a config."""

import numpy as np

from wardround.common.config import RunConfig

ARCHS = ("llava", "paligemma", "idefics3", "qwen2-vl")
QUESTION = "Is there a pleural effusion?"
IMAGE = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def vlm_config(arch, dp=True, **model):
    """A vlm run config of the tiny ``arch`` (Qwen2-VL: LoRA on the text tower)."""
    towers = ["text"] if arch == "qwen2-vl" else ["vision", "projector", "text"]
    return RunConfig().with_overrides(
        model={"family": "vlm", "tiny_arch": arch, "lora_towers": towers, **model},
        task={"kind": "vqa"},
        privacy={"enabled": dp},
    )
