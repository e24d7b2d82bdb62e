"""The run config's sections other than the model (one per TOML table).

Every section is frozen, refuses unknown keys and takes dashed or underscored names.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .enums import (
    MAX_SEED,
    MAX_TASK_ITEMS,
    MAX_VOCABULARY,
    Accountant,
    GradSampleMode,
    OptimizerKind,
    SecureMode,
    SliceMode,
    Strategy,
    TaskKind,
    TransportDtype,
)


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_dashed, populate_by_name=True
    )

    @model_validator(mode="before")
    @classmethod
    def _no_true_or_false_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1: `rounds = true` would run one round
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            if not _is_number(field.annotation):
                continue
            for key in {name, field.alias or name}:
                if isinstance(data.get(key), bool):
                    raise ValueError(
                        f"{key} is a number; {str(data[key]).lower()} is not one"
                    )
        return data


class _RunSection(_Section):
    """A section of the run config: shared with every site, and shown to its operator."""

    @model_validator(mode="before")
    @classmethod
    def _printable_text_only(cls, data: Any) -> Any:
        # A run.toml is written by the coordinator's admin and read by every site's
        # operator before approving it: a control or bidi character in a key or a
        # value (an ANSI escape, a newline) could redraw what the operator reads,
        # and a very long value push the real settings off the screen.
        if isinstance(data, dict):
            for key, value in data.items():
                where = _unprintable(key, shown_text(key))
                if where is None and not isinstance(value, BaseModel):
                    where = _unprintable(value, shown_text(key))
                if where is not None:
                    raise ValueError(
                        f"{where} holds a control or formatting character (a "
                        "newline, an escape sequence, a direction mark) or is longer "
                        f"than {MAX_TEXT} characters; a run config takes printable "
                        "text only"
                    )
        return data


MAX_TEXT = 1024
"""The longest text a run config holds in one value (a label, a path)."""


def shown_text(text: object) -> str:
    """``text`` for a message: as it is when printable, else escaped (``ascii``)."""
    plain = str(text)
    return plain if plain.isprintable() else ascii(plain)


def _unprintable(value: Any, where: str) -> str | None:
    """Where in ``value`` (a scalar, list or table) unusable text sits, else None."""
    if isinstance(value, str):
        if len(value) > MAX_TEXT or not value.isprintable():
            return where
        return None
    if isinstance(value, dict):
        items = [(f"{where} (key {shown_text(k)})", k) for k in value]
        items += [(f"{where}.{shown_text(k)}", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for place, item in items:
        found = _unprintable(item, place)
        if found is not None:
            return found
    return None


def _is_number(annotation: Any) -> bool:
    """Whether ``annotation`` is int or float, optionally with None."""
    numbers = (int, float)
    if annotation in numbers:
        return True
    args = getattr(annotation, "__args__", ())
    return bool(args) and all(a in numbers or a is type(None) for a in args)


DEFAULT_DELTA_CLIP_NORM = 64.0
"""Above the honest delta norms measured with the default model and recipes
(docs/privacy.md, "The delta bound"): a bound honest sites reach scales every
update down, and the federation learns slower than its sites."""


def personalised_in(federation: dict[str, Any]) -> bool:
    """Whether a ``[federation]`` section, as run.json dumps it, personalises sites.

    Each site then evaluates a model of its own, and the sites' mean AUROC is no
    one global model's.
    """
    return bool(federation.get("personal")) or bool(federation.get("own-model-weight"))


class FederationConfig(_RunSection):
    """How rounds run."""

    strategy: Strategy = Strategy.FEDAVG
    proximal_mu: float = Field(0.0, ge=0.0, le=100.0)
    rounds: int = Field(5, ge=1, le=10_000)
    repeatable_rounds: int = Field(
        0,
        ge=0,
        le=100,
        description="rounds a deployed run may ask again, training and evaluation (a coordinator "
        "resumed mid-round asks its round again under SecAgg+; a site that died "
        "while training answers a round asked again anew): every site answers this "
        "many more and, under DP, plans its noise for rounds + this releases, so a "
        "repeat stays within the run's epsilon. Not for SecAgg+ without DP",
    )
    round_retries: int = Field(
        2,
        ge=0,
        le=100,
        description="deployments: how many times a round (its training, then its "
        "evaluation) that fell short of min-sites because sites went away (no reply, "
        "offline, cut off mid-upload) is asked again once min-sites are connected; a "
        "site that had answered sends its kept answer again (in the clear: no new "
        "epsilon, not counted), one that died while training answers anew (counted, "
        "charged). Under SecAgg+ a masked answer is never sent again: a training "
        "round is asked again only within repeatable-rounds. 0: such a round stops "
        "the run",
    )
    min_sites: int = Field(
        3,
        ge=1,
        le=10_000,
        description="a round with fewer successful sites is asked again when sites "
        "went away (round-retries), else stops the run (at least 3 under secure "
        "aggregation)",
    )
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, gt=0.0, le=1.0)
    round_timeout_s: float = Field(3600.0, gt=0.0, le=604_800.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    delta_clip_norm: float = Field(
        DEFAULT_DELTA_CLIP_NORM,
        ge=0.0,
        le=10_000.0,
        description="L2 bound every site clips its adapter delta to before it leaves "
        "(a robustness bound against an outsized update; sets the secure-aggregation "
        "quantization). Set it above honest sites' delta norms: a bound they reach "
        "shrinks every update. 0: no clip (plain aggregation only)",
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
    transport_dtype: TransportDtype = Field(
        TransportDtype.FLOAT32,
        description="how a plain round's delta travels to the coordinator: float32, "
        "or float16 / bfloat16 for half the bytes (not under SecAgg+, which "
        "quantizes the delta itself)",
    )
    personal: tuple[str, ...] = Field(
        (),
        max_length=16,
        description="personalised sites: the model's trainable modules each site "
        "keeps to itself (e.g. ['head', 'wide']); they never leave the site, are "
        "not aggregated, and each site evaluates with its own",
    )
    own_model_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="personalised sites: each site also trains a model of its own "
        "on its patients alone (it never leaves the site) and evaluates with the "
        "mixture of the two models' probabilities, its own weighted by this share "
        "(0.5: equal). 0: off. Not with DP-SGD",
    )

    @property
    def personalised(self) -> bool:
        """Whether each site evaluates a model of its own (its modules, its model)."""
        return bool(self.personal) or self.own_model_weight > 0

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


class TrainConfig(_RunSection):
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
    cache_frozen_features: bool = Field(
        True,
        description="fusion family, encoders frozen (the DP recipe): compute each "
        "study's encoder embeddings once per run instead of at every step",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: cuda if available",
    )


def _refuse_repeats(where: str, values: tuple[str, ...]) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{where} lists {', '.join(map(repr, repeated))} twice")


class NumericFeature(_RunSection):
    """A numeric EHR feature with the federation-wide normalisation."""

    mean: float
    std: float = Field(gt=0.0)


def _default_categorical() -> dict[str, tuple[str, ...]]:
    # A typed factory: the lambda's inferred ``tuple[str, str]`` does not match the field.
    return {"sex": ("F", "M")}


DEFAULT_UNITS: dict[str, str] = {
    "age": "years",
    "temperature": "degC",
    "heart_rate": "bpm",
    "spo2": "%",
    "wbc": "10^9/L",
    "crp": "mg/L",
    "bnp": "pg/mL",
}
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),
    "temperature": (25.0, 45.0),
    "heart_rate": (10.0, 300.0),
    "spo2": (30.0, 100.0),
    "wbc": (0.0, 500.0),
    "crp": (0.0, 1000.0),
    "bnp": (0.0, 100_000.0),
}


def _with_defaults(
    declared: Any, defaults: dict[str, Any], numeric: Any
) -> dict[str, Any] | Any:
    """``declared`` over ``defaults``, for the run's numeric features.

    A run that writes ``[task.ranges] age = [0, 110]`` means age's range; reading it
    as "no range for the other features" would let a Fahrenheit column pass as
    Celsius without a word.
    """
    if not isinstance(declared, dict):
        return declared  # the field's own validation says what is wrong
    names = numeric.keys() if isinstance(numeric, dict) else defaults.keys()
    return {**{k: v for k, v in defaults.items() if k in names}, **declared}


class TaskConfig(_RunSection):
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
        default_factory=_default_categorical, max_length=MAX_TASK_ITEMS
    )
    units: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_UNITS),
        max_length=MAX_TASK_ITEMS,
        description="numeric feature -> the run's unit; sites declare theirs in "
        "site.toml and are converted to it. A declared table changes the features "
        "it names; the others keep their default",
    )
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(DEFAULT_RANGES),
        max_length=MAX_TASK_ITEMS,
        description="numeric feature -> plausible [low, high] in the run's unit; "
        "values outside become missing (and are counted by `site check`). A "
        "declared table changes the features it names; the others keep their default",
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

    @model_validator(mode="before")
    @classmethod
    def _keep_default_units_and_ranges(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        numeric = data.get("numeric")
        for key, defaults in (("units", DEFAULT_UNITS), ("ranges", DEFAULT_RANGES)):
            if key in data:
                data[key] = _with_defaults(data[key], defaults, numeric)
            elif isinstance(numeric, dict):
                data[key] = {k: v for k, v in defaults.items() if k in numeric}
        return data

    @model_validator(mode="after")
    def _labels_present(self) -> TaskConfig:
        if not self.labels:
            raise ValueError("labels must name at least one label")
        _refuse_repeats("labels", self.labels)
        if any(not label.strip() for label in self.labels):
            raise ValueError("labels: a label name is empty")
        for key in ("units", "ranges"):
            unknown = sorted(set(getattr(self, key)) - set(self.numeric))
            if unknown:
                raise ValueError(
                    f"{key} names {', '.join(map(repr, unknown))}, not a numeric "
                    f"feature of the run (numeric: {', '.join(self.numeric) or '-'})"
                )
        inputs = set(self.numeric) | set(self.categorical)
        leaked = sorted(inputs & set(self.labels))
        if leaked:
            # by default both read the same-named column: the answer as an input
            raise ValueError(
                f"{', '.join(map(repr, leaked))} is both a label and an input "
                "feature; rename one"
            )
        both = sorted(set(self.numeric) & set(self.categorical))
        if both:
            raise ValueError(
                f"{', '.join(map(repr, both))} is declared both numeric and "
                "categorical; keep one"
            )
        for name, feature in self.numeric.items():
            if not (math.isfinite(feature.mean) and math.isfinite(feature.std)):
                raise ValueError(f"numeric.{name}: mean and std must be finite")
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
            if not vocabulary:
                raise ValueError(f"categorical.{name}: name at least one value")
            _refuse_repeats(f"categorical.{name}", vocabulary)
        return self

    @property
    def ehr_width(self) -> int:
        """Width of the EHR vector: numeric values, their missingness, one-hots."""
        onehot = sum(len(v) + 1 for v in self.categorical.values())  # +1: unknown
        return 2 * len(self.numeric) + onehot


class DataConfig(_RunSection):
    """Where the sites' data is (simulation)."""

    sites_dir: str = ""
    synthesize_sites: int = Field(
        0, ge=0, le=256, description="make N synthetic sites if sites-dir is empty"
    )
    patients_per_site: int = Field(300, ge=10, le=1_000_000)
    synth_seed: int = Field(0, ge=0, le=MAX_SEED)


class PrivacyConfig(_RunSection):
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


class SecureAggregationConfig(_RunSection):
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
        if self.num_shares > 1.0 and self.reconstruction_threshold >= self.num_shares:
            # Flower's SecAgg+ workflow refuses it, but only when round 1 starts
            raise ValueError(
                f"reconstruction-threshold ({self.reconstruction_threshold:g}) must "
                f"be below num-shares ({self.num_shares:g})"
            )
        return self


class OutputConfig(_RunSection):
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
