"""Typed run configuration, parsed once at the edge.

One frozen :class:`RunConfig` per run, from a TOML file or a Flower
``run_config``; unknown keys are refused with the known ones, and every problem
is reported at once. The ``[model]`` section is one class per model family
(:mod:`.model`). Modules: :mod:`.enums` (closed vocabularies), :mod:`.sections`
(the other sections), :mod:`.model`, :mod:`.run` (the whole config and its
cross-section checks), :mod:`.parsing` (TOML files and error messages).
"""

from .enums import (
    ALL_MODALITIES,
    MAX_TASK_ITEMS,
    MAX_VOCABULARY,
    TINY_VLM_ARCHS,
    Accountant,
    Fusion,
    GradSampleMode,
    LoraVariant,
    Modality,
    ModelDtype,
    OptimizerKind,
    SecureMode,
    SliceMode,
    Strategy,
    TaskKind,
    TrainableScope,
    TransportDtype,
    VlmTower,
)
from .model import (
    DEFAULT_FAMILY,
    FAMILY_CONFIGS,
    FamilyModelConfig,
    FusionModelConfig,
    ModelConfig,
    VlmModelConfig,
)
from .parsing import _describe, _problems, flower_config_string
from .run import RunConfig
from .sections import (
    DataConfig,
    FederationConfig,
    NumericFeature,
    OutputConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    TaskConfig,
    TrainConfig,
    _dashed,
    _Section,
    personalised_in,
)

__all__ = [
    "ALL_MODALITIES",
    "DEFAULT_FAMILY",
    "FAMILY_CONFIGS",
    "MAX_TASK_ITEMS",
    "MAX_VOCABULARY",
    "TINY_VLM_ARCHS",
    "Accountant",
    "DataConfig",
    "FamilyModelConfig",
    "FederationConfig",
    "personalised_in",
    "Fusion",
    "FusionModelConfig",
    "GradSampleMode",
    "LoraVariant",
    "Modality",
    "ModelConfig",
    "ModelDtype",
    "NumericFeature",
    "OptimizerKind",
    "OutputConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "SecureMode",
    "SliceMode",
    "TransportDtype",
    "Strategy",
    "TaskConfig",
    "TaskKind",
    "TrainConfig",
    "TrainableScope",
    "VlmModelConfig",
    "VlmTower",
    "_Section",
    "_dashed",
    "_describe",
    "_problems",
    "flower_config_string",
]
