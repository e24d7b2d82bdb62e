"""``site.toml``: a site's own declaration of its data and settings.

Relative paths are resolved against the folder holding ``site.toml``. Column
mappings translate the run's feature and label names to this site's column names,
so hospitals with different EHR schemas join one federation.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from pydantic import Field, PrivateAttr, model_validator

from ..common.config import Accountant, _Section
from ..common.errors import ConfigError
from ..common.wire import ANSWERABLE_METRICS, DEFAULT_ANSWER_METRICS
from ..dashboard.settings import SiteDashboardSection
from ..ops.addresses import HOST_PORT
from ..ops.config_file import TomlFileConfig
from .ehr_database_config import EhrDatabaseSection
from .omop import omop_ehr_schema
from .pacs_config import PacsSection


class SiteSection(_Section):
    """Who the site is (never sent over the wire)."""

    name: str = "site"

    @model_validator(mode="after")
    def _named(self) -> SiteSection:
        if not self.name.strip():
            raise ValueError("name is empty: give the site the name its logs use")
        return self


class SiteDataSection(_Section):
    """Where the site's data lives."""

    dicom_dirs: tuple[str, ...] = Field(
        (),
        max_length=1024,
        description="the site's DICOM folders; none (and no [data.pacs]): a site "
        "without imaging (EHR and notes only), which trains in runs that do not "
        "require images",
    )
    ehr: str = Field(
        "ehr.parquet", description="the EHR table: a Parquet file or folder of them"
    )
    ehr_database: EhrDatabaseSection | None = Field(
        None, description="the EHR read from the site's PostgreSQL instead of `ehr`"
    )
    pacs: PacsSection | None = Field(
        None,
        description="the site's PACS: the EHR's studies are fetched (read-only) "
        "into the cache folder and indexed with any dicom-dirs",
    )
    cache_dir: str = ".wardround-cache"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_ehr_source(self) -> SiteDataSection:
        if any(not folder.strip() for folder in self.dicom_dirs):
            # "" resolves to site.toml's own folder: every file there, EHR included
            raise ValueError("dicom-dirs holds an empty path; name each folder")
        if self.ehr_database is not None and "ehr" in self.model_fields_set:
            raise ValueError(
                "set data.ehr (a Parquet table) or [data.ehr-database], not both"
            )
        return self


class ColumnType(StrEnum):
    """The physical type a site declares for a column (checked, not converted)."""

    NUMBER = "number"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    TEXT = "text"


class FeatureSpec(_Section):
    """One run feature in this site's table: column, type, unit, range, mapping."""

    column: str
    type: ColumnType | None = None
    unit: str | None = Field(
        None, description="this site's unit, converted to the run's"
    )
    unit_column: str | None = Field(
        None,
        description="a text column naming each row's unit (long-format tables, "
        "OMOP); converted row by row, an unknown unit counts as missing",
    )
    range: tuple[float, float] | None = Field(
        None, description="allowed [low, high] in this site's unit; outside -> missing"
    )
    map: dict[str, str] = Field(
        default_factory=dict,
        max_length=4096,
        description="categorical: this site's value -> the run's vocabulary value",
    )

    @model_validator(mode="after")
    def _range_ordered(self) -> FeatureSpec:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError("range must be [low, high] with low < high")
        if self.unit_column is not None and (
            self.unit is not None or self.range is not None
        ):
            raise ValueError(
                "unit-column gives each row's unit: leave out unit and range (the "
                "run's ranges apply after conversion)"
            )
        return self


class LabelSpec(_Section):
    """One run label in this site's table, with an optional value mapping."""

    column: str
    type: ColumnType | None = None
    positive: tuple[str, ...] = Field(
        (),
        max_length=1024,
        description="values meaning 1: a text column lists both positive and "
        "negative (a value in neither is unknown); numeric codes, or true/false",
    )
    negative: tuple[str, ...] = Field(
        (), max_length=1024, description="values meaning 0 (see positive)"
    )

    @model_validator(mode="after")
    def _one_meaning_per_value(self) -> LabelSpec:
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ValueError(
                f"{', '.join(map(repr, both))} is listed as both positive and negative"
            )
        return self


class EhrSchema(_Section):
    """Column names (and declared types, units, ranges, mappings) of the EHR table."""

    patient_id: str = "patient_id"
    study_uid: str = "study_uid"
    note: str | None = "note"
    report: str = Field(
        "report", description="report text column (vlm task 'report': the target)"
    )
    question: str = Field("question", description="question column (vlm task 'vqa')")
    answer: str = Field("answer", description="answer column (vlm task 'vqa')")
    features: dict[str, str | FeatureSpec] = Field(
        default_factory=dict,
        max_length=1024,
        description="run feature name -> column, or {column, type, unit, range, map}",
    )
    labels: dict[str, str | LabelSpec] = Field(
        default_factory=dict,
        max_length=1024,
        description="run label name -> column, or {column, type, positive, negative}",
    )
    _from_omop: bool = PrivateAttr(False)
    not_recorded: tuple[str, ...] = Field(
        (),
        max_length=1024,
        description="run features and labels this site does not record: a feature "
        "is missing in every row, a label unknown in every row (left out of "
        "training and AUROC here)",
    )

    @model_validator(mode="after")
    def _recorded_or_not(self) -> EhrSchema:
        both = sorted(set(self.not_recorded) & (set(self.features) | set(self.labels)))
        if both:
            raise ValueError(
                f"{', '.join(map(repr, both))} is mapped to a column and listed in "
                "not-recorded: keep one"
            )
        if any(not name.strip() for name in self.not_recorded):
            raise ValueError("not-recorded has an empty name")
        return self

    @property
    def from_omop(self) -> bool:
        """Whether the OMOP preset wrote this schema (its mapping is there)."""
        return self._from_omop

    def records(self, name: str) -> bool:
        """Whether this site records run feature or label ``name``."""
        return name not in self.not_recorded

    def feature_spec(self, feature: str) -> FeatureSpec:
        """The site's declaration for a run feature (default: same-named column)."""
        value = self.features.get(feature, feature)
        return value if isinstance(value, FeatureSpec) else FeatureSpec(column=value)

    def label_spec(self, label: str) -> LabelSpec:
        """The site's declaration for a run label (default: same-named column)."""
        value = self.labels.get(label, label)
        return value if isinstance(value, LabelSpec) else LabelSpec(column=value)

    def feature_column(self, feature: str) -> str:
        """The site's column for a run feature."""
        return self.feature_spec(feature).column

    def label_column(self, label: str) -> str:
        """The site's column for a run label."""
        return self.label_spec(label).column


class SitePrivacy(_Section):
    """The site's own privacy floor and budget. No run config can lower them."""

    required: bool = Field(True, description="refuse runs that train without DP-SGD")
    max_epsilon: float = Field(
        10.0,
        gt=0.0,
        le=1000.0,
        description="the most epsilon a single run may spend here",
    )
    budget_epsilon: float = Field(
        30.0,
        gt=0.0,
        le=1_000_000.0,
        description="epsilon this site's patients may lose over all runs (per base "
        "model), composed from the ledger",
    )
    max_delta: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="largest delta a run may use (default 1 / training patients), "
        "and the delta of the lifetime budget (default the smaller of 1e-5 and "
        "1 / training patients)",
    )
    accountant: Accountant = Field(
        Accountant.RDP,
        description="the accountant of the lifetime budget, whatever a run uses",
    )
    min_noise_multiplier: float = Field(
        0.0, ge=0.0, le=1000.0, description="refuse runs whose sigma would be lower"
    )
    ledger_dir: str = Field(
        "privacy-ledger", description="folder of the append-only privacy ledger"
    )

    @model_validator(mode="after")
    def _budget_covers_run(self) -> SitePrivacy:
        if self.budget_epsilon < self.max_epsilon:
            raise ValueError("budget-epsilon must be at least max-epsilon")
        return self


class SiteAnswers(_Section):
    """What this site answers: which per-site metrics leave, how coarse, how often.

    The coordinator asks; these limits are the site's and no run can widen them.
    """

    metrics: tuple[str, ...] = Field(
        DEFAULT_ANSWER_METRICS,
        description="per-site metric names that may leave this site ('auroc.*': "
        "AUROC per run label); privacy accounting always leaves",
    )
    decimals: int = Field(
        3, ge=0, le=6, description="every non-accounting metric is rounded to this"
    )
    count_granularity: int = Field(
        10,
        ge=1,
        le=10_000,
        description="example counts leave rounded up to a multiple of this",
    )
    evaluate: bool = Field(
        True,
        description="answer evaluate messages (at most one per approved round, "
        "plus the one before training)",
    )
    max_repeatable_rounds: int = Field(
        2,
        ge=0,
        le=100,
        description="refuse runs whose federation.repeatable-rounds is higher: each "
        "is one more training and evaluation the coordinator may ask",
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> SiteAnswers:
        unknown = [m for m in self.metrics if m not in ANSWERABLE_METRICS]
        if unknown:
            raise ValueError(
                f"unknown metric name(s) {', '.join(unknown)}; known: "
                + ", ".join(ANSWERABLE_METRICS)
            )
        return self


class SiteDeployment(_Section):
    """How the site daemon reaches the coordinator (``wardround site start``)."""

    coordinator: str = Field(
        "", description="host:port of the coordinator's SuperLink (outbound only)"
    )
    root_certificate: str = Field("", description="the federation's CA certificate")
    private_key: str = Field(
        "",
        description="the site's key (wardround keys site), enrolled at the coordinator",
    )
    state_dir: str = Field(
        ".wardround-site", description="approvals, audit log and the SuperNode's state"
    )
    runtime_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="loopback port of the SuperNode's local Runtime API (0: pick a free one)",
    )
    refusal_grace_s: float = Field(
        120.0,
        ge=0.0,
        le=86_400.0,
        description="a restarting coordinator re-enrols its sites: keep retrying a "
        "refused key this long before stopping",
    )
    poll_interval_s: float = Field(
        0.2,
        gt=0.0,
        le=3.0,
        description="how often the idle SuperNode asks the coordinator for work",
    )

    @model_validator(mode="after")
    def _coordinator_is_host_port(self) -> SiteDeployment:
        # Flower's SuperNode exits on anything else, and is restarted without end
        if self.coordinator and not HOST_PORT.fullmatch(self.coordinator):
            raise ValueError(
                f"coordinator {self.coordinator!r}: give HOST:PORT without a scheme "
                "or path, e.g. coordinator.example.org:9093 or [::1]:9093"
            )
        return self


class SiteConfig(TomlFileConfig):
    """A parsed ``site.toml``."""

    site: SiteSection = SiteSection()
    data: SiteDataSection = SiteDataSection()
    ehr: EhrSchema = EhrSchema()
    privacy: SitePrivacy = SitePrivacy()
    answers: SiteAnswers = SiteAnswers()
    deployment: SiteDeployment = SiteDeployment()
    dashboard: SiteDashboardSection = SiteDashboardSection()
    toml_hint: ClassVar[str] = (
        "Fix site.toml: `wardround synth` writes an example of its data sections, "
        "and deploy/README.md (Enrolling a site) shows its [deployment] section."
    )

    @model_validator(mode="after")
    def _omop_schema(self) -> SiteConfig:
        # The OMOP preset's query has the run's names: its mapping is the schema.
        database = self.data.ehr_database
        if database is None or database.omop is None:
            return self
        if "ehr" in self.model_fields_set:
            raise ValueError(
                "the OMOP preset maps the run's names under "
                "[data.ehr-database.omop]: leave out [ehr]"
            )
        schema = EhrSchema.model_validate(omop_ehr_schema(database.omop))
        schema._from_omop = True
        object.__setattr__(self, "ehr", schema)
        return self

    def resolve(self, relative: str) -> Path:
        """Resolve a path from site.toml against its folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def dicom_paths(self) -> list[Path]:
        """The DICOM folders, resolved."""
        return [self.resolve(d) for d in self.data.dicom_dirs]

    @property
    def has_imaging(self) -> bool:
        """Whether the site names DICOM folders (``data.dicom-dirs``) or a PACS."""
        return bool(self.data.dicom_dirs) or self.data.pacs is not None

    @property
    def ehr_path(self) -> Path:
        """The EHR Parquet file or dataset folder, resolved."""
        return self.resolve(self.data.ehr)

    @property
    def ledger_path(self) -> Path:
        """The privacy ledger folder, resolved."""
        return self.resolve(self.privacy.ledger_dir)

    @property
    def state_path(self) -> Path:
        """The site daemon's state folder, resolved."""
        return self.resolve(self.deployment.state_dir)

    @property
    def cache_path(self) -> Path:
        """The cache folder, resolved; owner-only (decoded images, PACS copies)."""
        from ..ops.private_folder import private_folder

        return private_folder(
            self.resolve(self.data.cache_dir), "[data] cache-dir", holds=self.base_dir
        )


def load_site_configs(site_tomls: list[Path]) -> list[SiteConfig]:
    """Every site's settings; one error naming every site.toml that fails.

    A folder of many sites is fixed in one pass, not one file per attempt.
    """
    loaded, failed = [], []
    for toml in site_tomls:
        try:
            loaded.append(SiteConfig.from_toml(toml))
        except ConfigError as exc:
            failed.append(exc)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise ConfigError(
            f"{len(failed)} of {len(site_tomls)} site.toml files have problems:\n"
            + "\n".join(exc.message for exc in failed),
            hint="\n".join(dict.fromkeys(exc.hint for exc in failed if exc.hint))
            or None,
        )
    return loaded


def check_distinct_names(site_tomls: list[Path]) -> None:
    """Refuse a federation of site folders where two sites share a ``[site] name``.

    A site's name seeds its rounds' randomness and names it in logs and reports:
    two sites with one name would draw the same noise and read as one.
    """
    from collections import defaultdict

    folders: dict[str, list[str]] = defaultdict(list)
    for toml, site in zip(site_tomls, load_site_configs(site_tomls), strict=True):
        folders[site.site.name].append(str(toml.parent))
    shared = {name: where for name, where in folders.items() if len(where) > 1}
    if shared:
        name, where = next(iter(sorted(shared.items())))
        raise ConfigError(
            f"sites {' and '.join(where)} share the name {name!r} ([site] name in "
            "their site.toml)",
            hint="Give every site its own [site] name.",
        )
