"""The ``[model]`` section: one config class per model family (a discriminated union).

``model.family`` picks the class (``fusion`` when absent); each class holds only
its own family's keys, so a key of the other family is refused by name
(:func:`.run.describe_errors` says which family takes it). Each class also
answers the questions the rest of the run config asks of its family
(:meth:`FamilyModelConfig.check_run`, :meth:`FamilyModelConfig.requires_images`),
so no code compares ``model.family`` as a string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import Discriminator, Field, Tag, model_validator

from ..errors import ConfigError
from .enums import (
    ALL_MODALITIES,
    MAX_SEED,
    TINY_VLM_ARCHS,
    Fusion,
    GradSampleMode,
    LoraVariant,
    Modality,
    ModelDtype,
    TaskKind,
    TrainableScope,
    VlmTower,
)
from .sections import _RunSection

if TYPE_CHECKING:
    from .run import RunConfig
    from .sections import TaskConfig

DEFAULT_FAMILY = "fusion"
"""The family of a ``[model]`` section that names none."""


class FamilyModelConfig(_RunSection):
    """What every family's model config has: the LoRA adapters and their init."""

    family: str
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: float = Field(16.0, gt=0.0, le=4096.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_variant: LoraVariant = Field(
        LoraVariant.LORA,
        description="'lora' (A and B train) or 'ffa' (FFA-LoRA: A frozen, B trains)",
    )
    init_seed: int = Field(0, ge=0, le=MAX_SEED)
    image_size: int = Field(
        64, ge=16, le=1024, description="side of the square image the model reads"
    )

    generative: ClassVar[bool] = False
    """True for families that write text (task.kind 'report' or 'vqa')."""
    dp_recipe: ClassVar[bool] = False
    """True when DP-SGD runs take the measured DP recipe's defaults (common/recipe.py)."""

    @classmethod
    def of(cls, run: RunConfig) -> Self:
        """``run``'s model config, which code of this family needs to be its own."""
        if not isinstance(run.model, cls):
            raise ConfigError(
                f"this needs model.family {cls.model_fields['family'].default!r}, "
                f"and the run's is {run.model.family!r}",
                hint="Set model.family in the run config.",
            )
        return run.model

    @property
    def trainable_scope(self) -> TrainableScope:
        """Which tensors train, before the recipe resolves 'auto'."""
        return TrainableScope.AUTO

    def check_run(self, run: RunConfig) -> None:
        """Raise ValueError when the rest of ``run`` does not fit this family."""
        generative_task = run.task.kind is not TaskKind.CLASSIFICATION
        if generative_task and not self.generative:
            raise ValueError(
                f"task.kind {run.task.kind.value!r} needs model.family 'vlm' (the "
                f"{self.family} family classifies: task.kind 'classification')"
            )
        if self.generative and not generative_task:
            raise ValueError(
                f"model.family {self.family!r} generates text: set task.kind to "
                "'report' or 'vqa'"
            )
        if self.generative and run.federation.own_model_weight:
            raise ValueError(
                f"federation.own-model-weight mixes two classifiers' probabilities; "
                f"model.family {self.family!r} generates text: set it to 0"
            )

    def requires_images(self, task: TaskConfig) -> bool:
        """Whether every study must have an image (see RunConfig.requires_images)."""
        raise NotImplementedError


class FusionModelConfig(FamilyModelConfig):
    """The ``fusion`` family: image, EHR and note encoders fused into a classifier."""

    family: Literal["fusion"] = "fusion"
    vision: str = Field(
        "tiny", description="'tiny' (built from config), a local path or hub id"
    )
    text: str = Field(
        "tiny", description="'tiny' (built from config), a local path or hub id"
    )
    tokenizer: str = Field("byte", description="'byte' or a local path / hub id")
    fusion: Fusion = Fusion.CONCAT
    modalities: tuple[Modality, ...] = ALL_MODALITIES
    max_note_tokens: int = Field(128, ge=8, le=4096)
    wide: bool = Field(
        True,
        description="add a linear term over the notes' hashed word n-grams "
        "and the EHR features to the logits (wide & deep): the model holds the "
        "logistic regression a statistician would fit, and the deep part adds to it",
    )
    note_ngram_buckets: int = Field(
        2**16,
        ge=256,
        le=2**22,
        description="hash buckets of the notes' word n-grams (the wide term's rows)",
    )
    max_note_ngrams: int = Field(
        256, ge=8, le=8192, description="distinct word n-grams kept per note"
    )
    hidden_size: int = Field(64, ge=8, le=16_384)
    base: str = Field(
        "pretrained",
        description="'pretrained' (encoders pretrained without labels on a "
        "public synthetic corpus, built on first use and cached), 'random', or a "
        "folder written by `wardround pretrain`",
    )
    trainable: TrainableScope = Field(
        TrainableScope.AUTO,
        description="'all' (LoRA on the encoders + every fusion layer), "
        "'fusion' (the fusion module, the head and the wide term, on the base's frozen "
        "features), 'auto' (fusion under DP-SGD)",
    )

    dp_recipe: ClassVar[bool] = True

    @model_validator(mode="after")
    def _some_modality(self) -> FusionModelConfig:
        if not self.modalities:
            raise ValueError("modalities must name at least one of image, ehr, note")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities lists a modality twice")
        return self

    @property
    def trainable_scope(self) -> TrainableScope:
        """Which tensors train, before the recipe resolves 'auto'."""
        return self.trainable

    def check_run(self, run: RunConfig) -> None:
        """Also refuse a fusion layer that ghost clipping cannot measure."""
        super().check_run(run)
        if (
            run.privacy.enabled
            and run.privacy.grad_sample_mode is GradSampleMode.GHOST
            and self.fusion is Fusion.CROSS_ATTENTION
        ):
            # Its key and value projections run once per modality, and Opacus's
            # ghost norms take one call per layer and step ("parameter tying").
            raise ValueError(
                "privacy.grad-sample-mode 'ghost' cannot measure model.fusion "
                "'cross-attention' (its key and value layers run once per "
                "modality): use grad-sample-mode 'hooks', or fusion 'concat' or "
                "'gated'"
            )

    def requires_images(self, task: TaskConfig) -> bool:
        """Only with images among the modalities and ``task.require-image`` true."""
        return task.require_image and Modality.IMAGE in self.modalities


class VlmModelConfig(FamilyModelConfig):
    """The ``vlm`` family: a Hugging Face image-text-to-text model that writes text."""

    family: Literal["vlm"] = "vlm"
    path: str = Field(
        "",
        description="a local folder written by save_pretrained, or a hub id in "
        "the local Hugging Face cache (AutoModelForImageTextToText + AutoProcessor)",
    )
    tiny_arch: str = Field(
        "",
        description="build a tiny random model of this architecture instead of "
        f"loading one ({', '.join(TINY_VLM_ARCHS)})",
    )
    lora_towers: tuple[VlmTower, ...] = Field(
        (VlmTower.VISION, VlmTower.PROJECTOR, VlmTower.TEXT),
        description="which parts get LoRA on their linear layers",
    )
    max_seq_tokens: int = Field(
        512, ge=16, le=32_768, description="longest prompt + answer, in tokens"
    )
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="longest generated answer, in tokens"
    )
    dtype: ModelDtype = Field(
        ModelDtype.FLOAT32,
        description="the frozen base weights' type ('auto': bfloat16 on a GPU "
        "that supports it); the LoRA factors stay float32",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass (less memory); "
        "not with DP-SGD",
    )
    pack_sequences: bool = Field(
        False,
        description="pack a batch's examples into one row without padding "
        "(llava, idefics3, smolvlm; not with DP-SGD)",
    )

    generative: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_source(self) -> VlmModelConfig:
        if self.tiny_arch and self.tiny_arch not in TINY_VLM_ARCHS:
            raise ValueError(
                f"tiny-arch {self.tiny_arch!r} is not one of {', '.join(TINY_VLM_ARCHS)}"
            )
        if bool(self.path) == bool(self.tiny_arch):
            raise ValueError(
                "family 'vlm' needs exactly one of model.path (a local folder or "
                "hub id) and model.tiny-arch (a tiny random model)"
            )
        if not self.lora_towers:
            raise ValueError(
                "lora-towers must name at least one of vision, projector, text"
            )
        return self

    def check_run(self, run: RunConfig) -> None:
        """Also refuse what breaks per-example gradients under DP-SGD."""
        super().check_run(run)
        if not run.privacy.enabled:
            return
        if run.privacy.grad_sample_mode is GradSampleMode.EW:
            raise ValueError(
                "privacy.grad-sample-mode 'ew' passes the model's input "
                "positionally, and vision-language models take keyword inputs: "
                "use 'hooks', 'functorch' or 'ghost' with model.family 'vlm'"
            )
        if (
            run.privacy.grad_sample_mode is GradSampleMode.GHOST
            and self.dtype is not ModelDtype.FLOAT32
        ):
            # Ghost clipping clips by norms measured in one backward pass and sums
            # the gradients of a second. Through a float32 base the passes agree to
            # float rounding; through a bfloat16 base they differ by bfloat16's, so
            # an example's clipped gradient could exceed max-grad-norm. hooks clips
            # the very per-example gradients it sums.
            raise ValueError(
                f"privacy.grad-sample-mode 'ghost' needs model.dtype = 'float32' "
                f"(got '{self.dtype.value}'): its two backward passes through a "
                "bfloat16 base round differently, and an example's clipped gradient "
                "could exceed privacy.max-grad-norm; use grad-sample-mode 'hooks' "
                "with a bfloat16 base"
            )
        if self.gradient_checkpointing:
            raise ValueError(
                "model.gradient-checkpointing runs the forward pass twice, which "
                "breaks Opacus's per-sample gradients: turn it off with DP-SGD "
                "(privacy.enabled = true)"
            )
        if self.pack_sequences:
            raise ValueError(
                "model.pack-sequences puts several patients in one row, so a "
                "row's gradient is no longer one record's: turn it off with DP-SGD"
            )

    def requires_images(self, task: TaskConfig) -> bool:
        """Always: a vlm's prompt holds the image."""
        return True


FAMILY_CONFIGS: dict[str, type[FamilyModelConfig]] = {
    "fusion": FusionModelConfig,
    "vlm": VlmModelConfig,
}
"""Each family's config class, by ``model.family``."""


def _family_tag(value: Any) -> Any:
    # dashed and underscored input alike carry the key as "family"
    if isinstance(value, dict):
        return value.get("family", DEFAULT_FAMILY)
    return getattr(value, "family", DEFAULT_FAMILY)


ModelConfig = Annotated[
    Annotated[FusionModelConfig, Tag("fusion")] | Annotated[VlmModelConfig, Tag("vlm")],
    Discriminator(
        _family_tag,
        custom_error_type="unknown_family",
        custom_error_message=(
            f"unknown model family; model.family is one of: {', '.join(FAMILY_CONFIGS)}"
        ),
    ),
]
"""The ``[model]`` section: the config class of its ``family``."""
