"""The global adapter as a PEFT adapter directory, loadable with ``PeftModel``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.adapter import load_adapter_state


def save_peft_adapter(
    model: torch.nn.Module, state: Mapping[str, np.ndarray], out_dir: Path
) -> Path:
    """Write ``state`` as a PEFT adapter directory (``adapter_config.json`` + safetensors).

    Loadable with ``PeftModel.from_pretrained(base_model, out_dir)`` onto the base
    model that :func:`wardround.models.build_model` makes from the run config.
    """
    load_adapter_state(model, state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A PeftModel: torch's Module typing does not know its save_pretrained.
    peft_model: Any = model
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
