"""The run config's closed vocabularies (enums) and size limits."""

from __future__ import annotations

from enum import StrEnum


class Strategy(StrEnum):
    """Server-side aggregation strategy."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


class Fusion(StrEnum):
    """How the modality embeddings are combined."""

    CONCAT = "concat"
    GATED = "gated"
    CROSS_ATTENTION = "cross-attention"


class Modality(StrEnum):
    """Input modalities of the fusion model."""

    IMAGE = "image"
    EHR = "ehr"
    NOTE = "note"


ALL_MODALITIES = (Modality.IMAGE, Modality.EHR, Modality.NOTE)


class LoraVariant(StrEnum):
    """Which LoRA factors train (and so what crosses the wire)."""

    LORA = "lora"
    """A and B train; FedAvg averages each factor (avg(B)·avg(A), not avg(B·A))."""
    FFA = "ffa"
    """FFA-LoRA: A frozen at its shared init, only B trains; averaging is exact."""


class TrainableScope(StrEnum):
    """Which tensors of the fusion family train (and so cross the wire)."""

    AUTO = "auto"
    """'fusion' under DP-SGD, 'all' without (the measured recipes: docs/privacy.md)."""
    ALL = "all"
    """LoRA on the encoders' attention; projections, EHR encoder, fusion and head in full."""
    FUSION = "fusion"
    """Encoders, projections and EHR encoder frozen (the base's features); LoRA on the
    fusion module, and the head and the wide term in full."""


class OptimizerKind(StrEnum):
    """The local optimizer (fresh every round)."""

    AUTO = "auto"
    """'sgd' under DP-SGD, 'adamw' without."""
    ADAMW = "adamw"
    SGD = "sgd"
    """SGD with momentum (``train.momentum``)."""


class Accountant(StrEnum):
    """Opacus privacy accountant used for sigma and for budget decisions."""

    RDP = "rdp"
    PRV = "prv"


class GradSampleMode(StrEnum):
    """How Opacus computes per-sample gradients."""

    HOOKS = "hooks"
    EW = "ew"
    FUNCTORCH = "functorch"
    GHOST = "ghost"
    """Ghost clipping: per-example gradient norms without per-example gradients,
    two backward passes a step (less memory for wide layers and large batches)."""


class SecureMode(StrEnum):
    """Opacus secure noise: auto = on in deployment, off in simulation."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class TransportDtype(StrEnum):
    """How a plain round's delta travels: float32, or half the bytes."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class SliceMode(StrEnum):
    """How a multi-frame image or a multi-slice series becomes one image input."""

    MIDDLE = "middle"
    MIP = "mip"
    CHANNELS = "channels"


class TaskKind(StrEnum):
    """What a run's model learns to do."""

    CLASSIFICATION = "classification"
    """Multi-label findings from image, EHR and note (the ``fusion`` family)."""
    REPORT = "report"
    """Image + the EHR as text -> the report text column (the ``vlm`` family)."""
    VQA = "vqa"
    """Image + a question -> its answer (the ``vlm`` family)."""


class VlmTower(StrEnum):
    """Parts of a vision-language model that can take LoRA adapters."""

    VISION = "vision"
    PROJECTOR = "projector"
    TEXT = "text"


class ModelDtype(StrEnum):
    """Floating-point type the frozen base weights are loaded in."""

    AUTO = "auto"
    """bfloat16 on a CUDA device that supports it, else float32."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


MAX_TASK_ITEMS = 1024
"""The most labels, numeric or categorical features a task may declare."""
MAX_VOCABULARY = 4096
"""The most values one categorical feature may have."""
MAX_SEED = 2**63 - 1
"""Seeds are non-negative and fit torch's and numpy's 64-bit seeding."""

TINY_VLM_ARCHS = ("llava", "paligemma", "idefics3", "qwen2-vl")
"""Architectures ``model.tiny-arch`` can build from a config (random init)."""
