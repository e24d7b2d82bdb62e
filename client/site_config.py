"""``site.toml``: a site's own declaration of its data and settings.

Relative paths are resolved against the folder holding ``site.toml``. Column
mappings translate the run's feature and label names to this site's column names,
so hospitals with different EHR schemas join one federation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from ..common.config import _describe, _Section, read_toml
from ..common.errors import ConfigError


class SiteSection(_Section):
    """Who the site is (never sent over the wire)."""

    name: str = "site"


class SiteDataSection(_Section):
    """Where the site's data lives."""

    dicom_dirs: tuple[str, ...] = ("dicom",)
    ehr: str = "ehr.parquet"
    cache_dir: str = ".wardround-cache"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0


class EhrSchema(_Section):
    """Column names of the site's EHR table."""

    patient_id: str = "patient_id"
    study_uid: str = "study_uid"
    note: str | None = "note"
    features: dict[str, str] = Field(
        default_factory=dict, description="run feature name -> column (default: same name)"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="run label name -> column (default: same name)"
    )

    def feature_column(self, feature: str) -> str:
        """The site's column for a run feature."""
        return self.features.get(feature, feature)

    def label_column(self, label: str) -> str:
        """The site's column for a run label."""
        return self.labels.get(label, label)


class SiteConfig(_Section):
    """A parsed ``site.toml``."""

    site: SiteSection = SiteSection()
    data: SiteDataSection = SiteDataSection()
    ehr: EhrSchema = EhrSchema()
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _dirs_given(self) -> SiteConfig:
        if not self.data.dicom_dirs:
            raise ValueError("data.dicom-dirs must name at least one folder")
        return self

    @classmethod
    def from_toml(cls, path: Path) -> SiteConfig:
        """Read and validate ``site.toml``; raise ConfigError listing every problem."""
        path = Path(path)
        raw: dict[str, Any] = read_toml(path)
        raw["base_dir"] = path.resolve().parent
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"{path} has {exc.error_count()} problem(s):\n" + _describe(exc, cls),
                hint="Fix site.toml; see the example that `wardround synth` writes.",
            ) from None

    def resolve(self, relative: str) -> Path:
        """Resolve a path from site.toml against its folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def dicom_paths(self) -> list[Path]:
        """The DICOM folders, resolved."""
        return [self.resolve(d) for d in self.data.dicom_dirs]

    @property
    def ehr_path(self) -> Path:
        """The EHR Parquet file or dataset folder, resolved."""
        return self.resolve(self.data.ehr)

    @property
    def cache_path(self) -> Path:
        """The index cache folder, resolved."""
        return self.resolve(self.data.cache_dir)
