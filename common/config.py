"""Typed run configuration, parsed once at the edge.

A run config is a nested TOML file (``wardround simulate --config run.toml``) or a
Flower ``run_config`` (flat, dotted keys, scalar values). Both become one frozen
:class:`RunConfig`; unknown keys are rejected with the list of known ones, and
every problem is reported at once.
"""

from __future__ import annotations

import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_dashed, populate_by_name=True
    )


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
    """Encoders, projections and EHR encoder frozen (the base's features); the fusion
    module and the head train in full."""


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
    """Refused by :class:`PrivacyConfig`: the trainer has no per-example loss for it."""


class SecureMode(StrEnum):
    """Opacus secure noise: auto = on in deployment, off in simulation."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


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

TINY_VLM_ARCHS = ("llava", "paligemma", "idefics3", "qwen2-vl")
"""Architectures ``model.tiny-arch`` can build from a config (random init)."""


class FederationConfig(_Section):
    """How rounds run."""

    strategy: Strategy = Strategy.FEDAVG
    proximal_mu: float = Field(0.0, ge=0.0, le=100.0)
    rounds: int = Field(5, ge=1, le=10_000)
    min_sites: int = Field(
        3,
        ge=1,
        le=10_000,
        description="a round with fewer successful sites stops the run (at least 3 "
        "under secure aggregation)",
    )
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, gt=0.0, le=1.0)
    round_timeout_s: float = Field(3600.0, gt=0.0, le=604_800.0)
    seed: int = 0
    delta_clip_norm: float = Field(
        4.0,
        ge=0.0,
        le=10_000.0,
        description="L2 bound every site clips its adapter delta to before it leaves "
        "(a robustness bound; sets the secure-aggregation quantization). 0: no clip "
        "(plain aggregation only)",
    )
    join_timeout_s: float = Field(
        120.0,
        gt=0.0,
        le=86_400.0,
        description="how long each round waits for the expected sites to connect "
        "before it goes ahead with those present (at least min-sites)",
    )
    expected_sites: int = Field(
        0,
        ge=0,
        le=10_000,
        description="how many sites the run expects; 0: min-sites (on a coordinator: "
        "the enrolled sites that are not revoked)",
    )
    personal: tuple[str, ...] = Field(
        (),
        max_length=16,
        description="personalised sites: the model's trainable modules each site "
        "keeps to itself (e.g. ['head', 'wide']); they never leave the site, are "
        "not aggregated, and each site evaluates with its own",
    )

    @model_validator(mode="after")
    def _mu_matches_strategy(self) -> FederationConfig:
        if self.strategy is Strategy.FEDPROX and self.proximal_mu <= 0.0:
            raise ValueError("strategy 'fedprox' needs proximal-mu > 0 (e.g. 0.01)")
        if self.strategy is not Strategy.FEDPROX and self.proximal_mu > 0.0:
            # FedAvg sends no mu: the sites would train without the term it names.
            raise ValueError(
                f"proximal-mu = {self.proximal_mu:g} needs strategy 'fedprox' "
                f"(strategy '{self.strategy.value}' applies no proximal term): set "
                "federation.strategy = 'fedprox' (--strategy fedprox), or drop "
                "proximal-mu"
            )
        if len(set(self.personal)) != len(self.personal) or not all(
            name.isidentifier() for name in self.personal
        ):
            raise ValueError(
                "personal must list module names (e.g. 'head', 'wide'), each once"
            )
        return self


class TrainConfig(_Section):
    """Local training at each site, per round."""

    local_epochs: int = Field(2, ge=1, le=1000)
    max_steps: int = Field(0, ge=0, le=1_000_000, description="0: whole local epochs")
    batch_size: int = Field(
        0, ge=0, le=65_536, description="0: the recipe's (16; 64 under DP-SGD)"
    )
    learning_rate: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="0: the recipe's (AdamW 5e-3; SGD 0.1 under DP-SGD)",
    )
    optimizer: OptimizerKind = Field(
        OptimizerKind.AUTO,
        description="'auto': SGD with momentum under DP-SGD, else AdamW",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD's momentum")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    eval_batch_size: int = Field(64, ge=1, le=65_536)
    eval_generations: int = Field(
        8,
        ge=0,
        le=10_000,
        description="vlm: validation examples each site generates text for per "
        "evaluation (exact match, text overlap, label agreement; kept at the site)",
    )
    modality_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="chance to hide a present modality per training example",
    )
    torch_threads: int = Field(1, ge=0, le=1024, description="0: torch's default")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: cuda if available",
    )


class ModelConfig(_Section):
    """The base model and its adapters."""

    family: str = "fusion"
    vision: str = Field(
        "tiny", description="'tiny' (built from config), a local path or hub id"
    )
    text: str = Field(
        "tiny", description="'tiny' (built from config), a local path or hub id"
    )
    tokenizer: str = Field("byte", description="'byte' or a local path / hub id")
    fusion: Fusion = Fusion.CONCAT
    modalities: tuple[Modality, ...] = ALL_MODALITIES
    image_size: int = Field(64, ge=16, le=1024)
    max_note_tokens: int = Field(128, ge=8, le=4096)
    wide: bool = Field(
        True,
        description="fusion: add a linear term over the notes' hashed word n-grams "
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
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: float = Field(16.0, gt=0.0, le=4096.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_variant: LoraVariant = Field(
        LoraVariant.LORA,
        description="'lora' (A and B train) or 'ffa' (FFA-LoRA: A frozen, B trains)",
    )
    init_seed: int = 0
    base: str = Field(
        "pretrained",
        description="fusion: 'pretrained' (encoders pretrained without labels on a "
        "public synthetic corpus, built on first use and cached), 'random', or a "
        "folder written by `wardround pretrain`",
    )
    trainable: TrainableScope = Field(
        TrainableScope.AUTO,
        description="fusion: 'all' (LoRA on the encoders + every fusion layer), "
        "'fusion' (only the fusion module and head), 'auto' (fusion under DP-SGD)",
    )
    # -- the ``vlm`` family (generative vision-language models) --------------
    path: str = Field(
        "",
        description="vlm: a local folder written by save_pretrained, or a hub id in "
        "the local Hugging Face cache (AutoModelForImageTextToText + AutoProcessor)",
    )
    tiny_arch: str = Field(
        "",
        description="vlm: build a tiny random model of this architecture instead of "
        f"loading one ({', '.join(TINY_VLM_ARCHS)})",
    )
    lora_towers: tuple[VlmTower, ...] = Field(
        (VlmTower.VISION, VlmTower.PROJECTOR, VlmTower.TEXT),
        description="vlm: which parts get LoRA on their linear layers",
    )
    max_seq_tokens: int = Field(
        512, ge=16, le=32_768, description="vlm: longest prompt + answer, in tokens"
    )
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="vlm: longest generated answer, in tokens"
    )
    dtype: ModelDtype = Field(
        ModelDtype.FLOAT32,
        description="vlm: the frozen base weights' type ('auto': bfloat16 on a GPU "
        "that supports it); the LoRA factors stay float32",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="vlm: recompute activations in the backward pass (less memory); "
        "not with DP-SGD",
    )
    pack_sequences: bool = Field(
        False,
        description="vlm: pack a batch's examples into one row without padding "
        "(llava, idefics3, smolvlm; not with DP-SGD)",
    )

    @model_validator(mode="after")
    def _some_modality(self) -> ModelConfig:
        if not self.modalities:
            raise ValueError("modalities must name at least one of image, ehr, note")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities lists a modality twice")
        if self.tiny_arch and self.tiny_arch not in TINY_VLM_ARCHS:
            raise ValueError(
                f"tiny-arch {self.tiny_arch!r} is not one of {', '.join(TINY_VLM_ARCHS)}"
            )
        if self.family == "vlm":
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


class NumericFeature(_Section):
    """A numeric EHR feature with the federation-wide normalisation."""

    mean: float
    std: float = Field(gt=0.0)


class TaskConfig(_Section):
    """What is predicted from what. Shared by every site of a run.

    Normalisation statistics and categorical vocabularies are declared here, never
    derived from one site's data.
    """

    kind: TaskKind = Field(
        TaskKind.CLASSIFICATION,
        description="'classification' (fusion family), 'report' or 'vqa' (vlm family)",
    )
    labels: tuple[str, ...] = Field(
        ("nodule", "effusion", "pneumonia", "cardiomegaly"), max_length=MAX_TASK_ITEMS
    )
    numeric: dict[str, NumericFeature] = Field(
        default_factory=lambda: {
            "age": NumericFeature(mean=60.0, std=15.0),
            "temperature": NumericFeature(mean=37.2, std=0.8),
            "heart_rate": NumericFeature(mean=85.0, std=15.0),
            "spo2": NumericFeature(mean=95.0, std=3.0),
            "wbc": NumericFeature(mean=9.0, std=3.5),
            "crp": NumericFeature(mean=30.0, std=40.0),
            "bnp": NumericFeature(mean=300.0, std=400.0),
        },
        max_length=MAX_TASK_ITEMS,
    )
    categorical: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: {"sex": ("F", "M")}, max_length=MAX_TASK_ITEMS
    )
    units: dict[str, str] = Field(
        default_factory=lambda: {
            "age": "years",
            "temperature": "degC",
            "heart_rate": "bpm",
            "spo2": "%",
            "wbc": "10^9/L",
            "crp": "mg/L",
            "bnp": "pg/mL",
        },
        max_length=MAX_TASK_ITEMS,
        description="numeric feature -> the run's unit; sites declare theirs in "
        "site.toml and are converted to it",
    )
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "age": (0.0, 120.0),
            "temperature": (25.0, 45.0),
            "heart_rate": (10.0, 300.0),
            "spo2": (30.0, 100.0),
            "wbc": (0.0, 500.0),
            "crp": (0.0, 1000.0),
            "bnp": (0.0, 100_000.0),
        },
        max_length=MAX_TASK_ITEMS,
        description="numeric feature -> plausible [low, high] in the run's unit; "
        "values outside become missing (and are counted by `site check`)",
    )
    require_image: bool = Field(
        True,
        description="false: EHR rows without a DICOM study train without image, "
        "and sites without imaging (no data.dicom-dirs) can take part",
    )
    slice_mode: SliceMode = Field(
        SliceMode.MIDDLE,
        description="multi-frame images and multi-slice series: middle slice, "
        "max-intensity projection, or `image-channels` slices as channels",
    )
    image_channels: int = Field(
        1,
        ge=1,
        le=16,
        description="channels of the image input (> 1 only with slice-mode 'channels')",
    )

    @model_validator(mode="after")
    def _labels_present(self) -> TaskConfig:
        if not self.labels:
            raise ValueError("labels must name at least one label")
        if (self.image_channels > 1) != (self.slice_mode is SliceMode.CHANNELS):
            raise ValueError(
                "image-channels > 1 goes with slice-mode 'channels' (and only with it)"
            )
        for name, (low, high) in self.ranges.items():
            if not low < high:
                raise ValueError(f"ranges.{name}: low must be below high")
        for name, vocabulary in self.categorical.items():
            if len(vocabulary) > MAX_VOCABULARY:
                raise ValueError(f"categorical.{name}: at most {MAX_VOCABULARY} values")
        return self

    @property
    def ehr_width(self) -> int:
        """Width of the EHR vector: numeric values, their missingness, one-hots."""
        onehot = sum(len(v) + 1 for v in self.categorical.values())  # +1: unknown
        return 2 * len(self.numeric) + onehot


class DataConfig(_Section):
    """Where the sites' data is (simulation)."""

    sites_dir: str = ""
    synthesize_sites: int = Field(
        0, ge=0, le=256, description="make N synthetic sites if sites-dir is empty"
    )
    patients_per_site: int = Field(300, ge=10, le=1_000_000)
    synth_seed: int = 0


class PrivacyConfig(_Section):
    """Record-level DP-SGD at every site (Opacus). Each site's own floor still applies."""

    enabled: bool = True
    target_epsilon: float = Field(
        8.0, gt=0.0, le=1000.0, description="epsilon this run may spend at a site"
    )
    target_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(
        1.0, gt=0.0, le=1000.0, description="per-example clip (L2)"
    )
    accountant: Accountant = Accountant.RDP
    grad_sample_mode: GradSampleMode = GradSampleMode.HOOKS
    secure_mode: SecureMode = SecureMode.AUTO

    @model_validator(mode="after")
    def _mode_can_run(self) -> PrivacyConfig:
        if self.grad_sample_mode is GradSampleMode.GHOST:
            # Ghost clipping clips through Opacus's own criterion wrapper on
            # per-example losses; the trainer's objectives return the batch's mean.
            raise ValueError(
                "privacy.grad-sample-mode 'ghost' is not supported: Opacus's ghost "
                "clipping needs its own loss wrapper, which the local trainer does "
                "not use; use 'hooks' (the default), 'ew' or 'functorch'"
            )
        return self


class SecureAggregationConfig(_Section):
    """Flower's SecAgg+: the coordinator only sees the masked sum of the deltas."""

    enabled: bool = True
    num_shares: float = Field(
        1.0,
        gt=0.0,
        le=10_000.0,
        description="key shares per site: a fraction of the sampled sites (<= 1.0) "
        "or a count (> 2)",
    )
    reconstruction_threshold: float = Field(
        0.67,
        gt=0.0,
        le=10_000.0,
        description="shares needed to unmask: a fraction of num-shares (<= 1.0) or a "
        "count; sites that may drop out = shares - threshold",
    )
    stage_timeout_s: float = Field(
        600.0,
        gt=0.0,
        le=86_400.0,
        description="how long each protocol stage waits for replies",
    )

    @model_validator(mode="after")
    def _shares_valid(self) -> SecureAggregationConfig:
        if self.num_shares > 1.0 and (
            self.num_shares != int(self.num_shares) or self.num_shares <= 2
        ):
            raise ValueError("num-shares above 1.0 must be a whole number above 2")
        if self.reconstruction_threshold > 1.0 and (
            self.reconstruction_threshold != int(self.reconstruction_threshold)
        ):
            raise ValueError(
                "reconstruction-threshold above 1.0 must be a whole number"
            )
        return self


class OutputConfig(_Section):
    """Where the run directory goes."""

    dir: str = "runs/latest"
    checkpoint_every: int = Field(
        1, ge=0, le=10_000, description="0: no per-round checkpoints"
    )
    resume: bool = Field(
        False,
        description="continue the run in `dir` from its last intact checkpoint "
        "(same run id; the config but for this section must be unchanged)",
    )


class RunConfig(_Section):
    """Everything a run needs, shared by the coordinator and all sites."""

    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _task_fits_family(self) -> RunConfig:
        generative = self.task.kind is not TaskKind.CLASSIFICATION
        if self.model.family == "vlm" and not generative:
            raise ValueError(
                "model.family 'vlm' generates text: set task.kind to 'report' or 'vqa'"
            )
        if self.model.family == "fusion" and generative:
            raise ValueError(
                f"task.kind {self.task.kind.value!r} needs model.family 'vlm' (the "
                "fusion family classifies: task.kind 'classification')"
            )
        if self.model.family == "vlm" and self.privacy.enabled:
            if self.privacy.grad_sample_mode is GradSampleMode.EW:
                raise ValueError(
                    "privacy.grad-sample-mode 'ew' passes the model's input "
                    "positionally, and vision-language models take keyword inputs: "
                    "use 'hooks' or 'functorch' with model.family 'vlm'"
                )
            if self.model.gradient_checkpointing:
                raise ValueError(
                    "model.gradient-checkpointing runs the forward pass twice, which "
                    "breaks Opacus's per-sample gradients: turn it off with DP-SGD "
                    "(privacy.enabled = true)"
                )
            if self.model.pack_sequences:
                raise ValueError(
                    "model.pack-sequences puts several patients in one row, so a "
                    "row's gradient is no longer one record's: turn it off with DP-SGD"
                )
        return self

    @model_validator(mode="after")
    def _secagg_needs_clip(self) -> RunConfig:
        if self.secure_aggregation.enabled and self.federation.delta_clip_norm <= 0:
            raise ValueError(
                "secure-aggregation needs federation.delta-clip-norm > 0 (it sets the "
                "quantization range)"
            )
        if self.secure_aggregation.enabled and self.federation.min_sites < 3:
            # common.secagg_math.MIN_PARTICIPANTS: sites refuse SecAgg+ among fewer
            raise ValueError(
                "secure-aggregation needs federation.min-sites >= 3 (sites refuse "
                "SecAgg+ among fewer: with 2, each site's one pairwise mask comes "
                "from a 32-bit seed); disable it for a run of 1 or 2 sites "
                "(secure-aggregation.enabled = false, or --no-secagg)"
            )
        return self

    @property
    def requires_images(self) -> bool:
        """Whether every study must have an image (a site without imaging cannot train).

        True for a vlm (its prompt holds the image) and for a fusion model that reads
        images with ``task.require-image`` true. False when the model reads no image,
        or when studies without image train on their EHR and note (the
        missing-modality path, ``task.require-image`` false).
        """
        if self.model.family == "vlm":
            return True
        return self.task.require_image and Modality.IMAGE in self.model.modalities

    # -- parsing ---------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls, raw: dict[str, Any], *, source: str = "run config"
    ) -> RunConfig:
        """Validate a nested mapping; raise ConfigError listing every problem."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"{source} has {exc.error_count()} problem(s):\n" + _describe(exc, cls),
                hint="Fix the keys above; `wardround simulate --help` shows the options.",
            ) from None

    @classmethod
    def from_toml(cls, path: Path) -> RunConfig:
        """Read a run config TOML file."""
        return cls.from_mapping(read_toml(path), source=str(path))

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Rebuild from a Flower ``run_config`` (flat dotted keys, JSON for lists)."""
        nested: dict[str, Any] = {}
        for key, value in run_config.items():
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            node[leaf] = value
        return cls.from_mapping(nested, source="Flower run_config")

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flatten to a Flower ``run_config``: dotted keys, scalars, JSON for the rest."""
        flat: dict[str, bool | int | float | str] = {}
        for section, values in self.model_dump(mode="json", by_alias=True).items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = (
                    value
                    if isinstance(value, (bool, int, float, str))
                    else json.dumps(value)
                )
        return flat

    def with_overrides(self, **sections: dict[str, Any]) -> RunConfig:
        """Return a copy with some keys of some sections replaced (validated)."""
        raw = self.model_dump(mode="json", by_alias=True)
        for section, values in sections.items():
            raw[_dashed(section)].update({_dashed(k): v for k, v in values.items()})
        return RunConfig.from_mapping(raw)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file or raise ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="Check the path.")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"][:-1])
            lines.append(
                f"  - {where}: unknown key; known keys here: {', '.join(known)}"
            )
        elif not err["loc"]:
            # a check across sections: its input is the whole config, not worth echoing
            lines.append(f"  - {where}: {err['msg']}")
        else:
            lines.append(f"  - {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", {})
        match = next((f for name, f in fields.items() if part in (name, f.alias)), None)
        if match is None or not isinstance(match.annotation, type):
            return []
        current = match.annotation
    fields = getattr(current, "model_fields", {})
    return sorted(f.alias or name for name, f in fields.items())


def flower_config_string(value: str) -> str:
    """``value`` quoted for Flower's ``key=value`` arguments (``--node-config``, ``--run-config``).

    Flower reads each value as TOML after splitting on a regular expression that
    ends a quoted value at its first closing quote: single quotes (literal, no
    escapes) unless the value holds one, else double quotes with escaped backslashes.
    """
    if "\n" in value or ("'" in value and '"' in value):
        raise ConfigError(
            f"the path {value!r} cannot be passed to Flower (it holds a newline, or "
            "both ' and \")",
            hint="Use a path without quote characters or newlines.",
        )
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\") + '"'
