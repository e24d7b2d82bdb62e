"""The whole run config: its sections, the checks across them, and its forms.

A run config is a nested TOML file (``wardround simulate --config run.toml``) or a
Flower ``run_config`` (flat, dotted keys, scalar values). Both become one frozen
:class:`RunConfig`; unknown keys are rejected with the list of known ones, and
every problem is reported at once.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError, model_validator

from ..errors import ConfigError
from .enums import TransportDtype
from .model import FamilyModelConfig, FusionModelConfig, ModelConfig
from .parsing import _keys, _problems
from .sections import (
    DataConfig,
    FederationConfig,
    OutputConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    TaskConfig,
    TrainConfig,
    _dashed,
    _Section,
)


class RunConfig(_Section):
    """Everything a run needs, shared by the coordinator and all sites."""

    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    model: ModelConfig = FusionModelConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _task_fits_family(self) -> RunConfig:
        self.model.check_run(self)
        return self

    @model_validator(mode="after")
    def _secagg_needs_clip(self) -> RunConfig:
        if self.secure_aggregation.enabled and self.federation.delta_clip_norm <= 0:
            raise ValueError(
                "secure-aggregation needs federation.delta-clip-norm > 0 (it sets the "
                "quantization range)"
            )
        if (
            self.secure_aggregation.enabled
            and self.federation.transport_dtype is not TransportDtype.FLOAT32
        ):
            raise ValueError(
                f"federation.transport-dtype = "
                f"'{self.federation.transport_dtype.value}' applies to plain rounds; "
                "SecAgg+ quantizes the float32 delta itself: set "
                "secure-aggregation.enabled = false (--no-secagg), or drop "
                "transport-dtype"
            )
        if (
            self.federation.transport_dtype is not TransportDtype.FLOAT32
            and self.federation.delta_clip_norm <= 0
        ):
            # Unclipped, a float16 delta can overflow (65,504) and the coordinator
            # has no bound to check a site's delta against.
            raise ValueError(
                "federation.transport-dtype = "
                f"'{self.federation.transport_dtype.value}' needs "
                "federation.delta-clip-norm > 0 (e.g. 64)"
            )
        if self.privacy.enabled and self.federation.own_model_weight:
            # Its training and the metrics it enters are outside the accountant's
            # count of DP-SGD steps.
            raise ValueError(
                "federation.own-model-weight trains a model on each site's patients "
                "outside DP-SGD: set it to 0 for a DP run, or keep modules at each "
                "site with federation.personal (they train under DP-SGD)"
            )
        if self.secure_aggregation.enabled and self.federation.min_sites < 3:
            # common.secagg_math.MIN_PARTICIPANTS: sites refuse SecAgg+ among fewer
            raise ValueError(
                "secure-aggregation needs federation.min-sites >= 3 (sites refuse "
                "SecAgg+ among fewer: with 2, each site's one pairwise mask comes "
                "from a 32-bit seed); disable it for a run of 1 or 2 sites "
                "(secure-aggregation.enabled = false, or --no-secagg)"
            )
        if (
            self.federation.repeatable_rounds
            and self.secure_aggregation.enabled
            and not self.privacy.enabled
        ):
            # Masked without DP a site answers a round once: spares would only be
            # questions. In the clear they pay for a site that died mid-training.
            raise ValueError(
                "federation.repeatable-rounds does not apply to SecAgg+ runs without "
                "DP: a masked round is answered once (a second masked sum could give "
                "a site's update away); drop repeatable-rounds, or turn DP on"
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
        return self.model.requires_images(self.task)

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
                _problems(source, exc, cls),
                hint="Fix the keys above; `wardround config` prints every key with "
                "its default.",
            ) from None

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
        """Return a copy with some keys of some sections replaced (validated).

        A new ``model.family`` keeps the keys every family has (the LoRA settings)
        and takes the new family's defaults for the rest.
        """
        raw = self.model_dump(mode="json", by_alias=True)
        for section, values in sections.items():
            values = {_dashed(k): v for k, v in values.items()}
            if section == "model" and values.get("family", self.model.family) != (
                self.model.family
            ):
                shared = _keys(FamilyModelConfig)
                raw["model"] = {k: v for k, v in raw["model"].items() if k in shared}
            raw[_dashed(section)].update(values)
        return RunConfig.from_mapping(raw)
