"""Features and labels a site does not record (`[ehr] not-recorded`): no column is
needed, a feature is missing in every row, a label unknown in every row, and
`site check` says so once instead of refusing the site."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomli_w
from pydantic import ValidationError
from typer.testing import CliRunner

from wardround.cli import app
from wardround.common.config import TaskConfig
from wardround.sitedata.ehr import EhrStats, encode_batch, schema_problems
from wardround.sitedata.site_config import EhrSchema
from wardround.synthetic.hospitals import synthesize_federation

TASK = TaskConfig()
runner = CliRunner()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hospitals")
    synthesize_federation(out, 1, patients_per_site=30, seed=3, image_less_sites=1)
    return out / "site-01"


def _without_columns(site: Path, tmp_path: Path, drop: list[str]) -> Path:
    """A copy of the site whose EHR table lacks ``drop`` (site.toml unchanged)."""
    doc = tomllib.loads((site / "site.toml").read_text())
    table = pq.read_table(site / doc["data"].get("ehr", "ehr.parquet"))
    pq.write_table(table.drop_columns(drop), tmp_path / "ehr.parquet")
    doc["data"]["ehr"] = str(tmp_path / "ehr.parquet")
    doc["data"]["cache-dir"] = str(tmp_path / "cache")
    doc.setdefault("privacy", {})["ledger-dir"] = str(tmp_path / "ledger")
    (tmp_path / "site.toml").write_text(tomli_w.dumps(doc))
    return tmp_path / "site.toml"


def _declare(toml: Path, not_recorded: list[str]) -> None:
    doc = tomllib.loads(toml.read_text())
    doc.setdefault("ehr", {})["not-recorded"] = not_recorded
    toml.write_text(tomli_w.dumps(doc))


def _check(toml: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["site", "check", "--config", str(toml), "--json"])
    return result.exit_code, json.loads(result.output)


def test_a_missing_column_names_the_not_recorded_way_out(site, tmp_path):
    toml = _without_columns(site, tmp_path, ["crp", "nodule"])

    code, report = _check(toml)

    assert code != 0 and not report["can_train"]
    (problem,) = report["blocking"]
    assert "'crp' (feature crp)" in problem and "'nodule' (label nodule)" in problem
    assert 'add "nodule" to `[ehr] not-recorded`' in problem


def test_a_site_that_does_not_record_a_feature_and_a_label_trains(site, tmp_path):
    toml = _without_columns(site, tmp_path, ["crp", "nodule"])
    _declare(toml, ["crp", "nodule"])

    code, report = _check(toml)

    assert code == 0 and report["can_train"], report["blocking"]
    assert report["ehr"]["not_recorded"] == ["crp", "nodule"]
    said = [w for w in report["warnings"] if "not recorded here" in w]
    assert len(said) == 2
    assert "crp" in said[0] and "missing in every row" in said[0]
    assert "nodule" in said[1] and "no AUROC" in said[1]
    # said once: not again as an unknown label or a missing feature
    assert not any("'nodule'" in w or "'crp'" in w for w in report["warnings"])
    assert report["ehr"]["label_examples"]["nodule"] == {"positive": 0, "negative": 0}
    assert report["ehr"]["label_prevalence"]["nodule"] is None
    assert report["ehr"]["missing_fraction"]["crp"] == 1.0


def test_a_not_recorded_name_the_run_lacks_is_pointed_out(site, tmp_path):
    toml = _without_columns(site, tmp_path, [])
    _declare(toml, ["lactate"])

    code, report = _check(toml)

    assert code == 0
    assert any(
        "not-recorded names 'lactate'" in w and "spelling" in w
        for w in report["warnings"]
    )


def test_not_recorded_names_read_as_missing_and_unknown_in_every_row(site):
    doc = tomllib.loads((site / "site.toml").read_text())
    table = pq.read_table(site / doc["data"].get("ehr", "ehr.parquet"))
    table = table.drop_columns(["crp", "sex", "pneumonia"])
    schema = EhrSchema.model_validate(
        {**doc.get("ehr", {}), "not-recorded": ["crp", "sex", "pneumonia"]}
    )

    assert schema_problems(table.schema, TASK, schema) == []
    stats = EhrStats()
    enc = encode_batch(table, TASK, schema, stats)

    numeric = list(TASK.numeric)
    n, crp = len(numeric), numeric.index("crp")
    assert (enc.features[:, crp] == 0).all() and (enc.features[:, n + crp] == 1).all()
    sex_unknown = 2 * n + len(TASK.categorical["sex"])  # sex is the only category
    assert list(TASK.categorical) == ["sex"]
    assert (enc.features[:, sex_unknown] == 1).all()
    k = list(TASK.labels).index("pneumonia")
    assert enc.label_null[:, k].all() and not enc.labels[:, k].any()
    assert not enc.label_null[:, list(TASK.labels).index("effusion")].all()
    assert stats.label_unmapped.get("pneumonia", 0) == 0
    assert np.isfinite(enc.features).all()


def test_a_name_mapped_and_not_recorded_is_refused():
    with pytest.raises(ValidationError, match="listed in not-recorded"):
        EhrSchema.model_validate(
            {"labels": {"nodule": "NOD"}, "not-recorded": ["nodule"]}
        )
    with pytest.raises(ValidationError, match="empty name"):
        EhrSchema.model_validate({"not-recorded": [" "]})


def test_loading_warns_once_about_unknown_labels_and_never_about_declared_ones(
    site, tmp_path, caplog
):
    import logging

    from wardround.common.text import get_tokenizer
    from wardround.sitedata.dataset import each_data_warning_once, load_site_data
    from wardround.sitedata.site_config import SiteConfig

    toml = _without_columns(site, tmp_path, ["nodule"])
    _declare(toml, ["nodule"])
    # an unknown cell in a recorded label: warned about, once per process
    doc = tomllib.loads(toml.read_text())
    table = pq.read_table(doc["data"]["ehr"])
    effusion = table.column("effusion").to_pylist()
    effusion[0] = None
    table = table.set_column(
        table.schema.get_field_index("effusion"), "effusion", [effusion]
    )
    pq.write_table(table, doc["data"]["ehr"])
    config = SiteConfig.from_toml(toml)

    def load(size: int) -> None:
        load_site_data(
            config,
            TaskConfig(require_image=False),  # an image-less site
            image_size=size,
            max_note_tokens=32,
            tokenizer=get_tokenizer("byte"),
        )

    def said() -> list[str]:
        found = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return [m for m in found if "label cell" in m]

    with caplog.at_level(logging.WARNING, logger="wardround.sitedata.dataset"):
        with each_data_warning_once():  # as a study does
            load(16)
            load(24)  # another model configuration, the same data
        once = said()
        load(16)  # a site daemon's next run says it again
        load(16)
        again = said()

    assert len(once) == 1
    assert "effusion 1" in once[0] and "nodule" not in once[0]
    assert len(again) == 2


def test_the_missing_column_message_offers_not_recorded_only_where_it_applies(site):
    from wardround.sitedata.omop import OmopPreset, omop_ehr_schema

    doc = tomllib.loads((site / "site.toml").read_text())
    table = pq.read_table(site / doc["data"].get("ehr", "ehr.parquet"))
    # a unit column is not a run feature: not-recorded would not help
    with_unit = EhrSchema.model_validate(
        {"features": {"crp": {"column": "crp", "unit-column": "crp_unit"}}}
    )
    (problem,) = schema_problems(table.schema, TASK, with_unit)
    assert "'crp_unit'" in problem and "not-recorded" not in problem
    # an OMOP site maps its names under [data.ehr-database.omop]
    preset = OmopPreset.model_validate({"not-recorded": ["bnp"]})
    omop = EhrSchema.model_validate(omop_ehr_schema(preset))
    omop._from_omop = True
    assert omop.not_recorded == ("bnp",)
    problems = schema_problems(table.drop_columns(["crp"]).schema, TASK, omop)
    crp = next(p for p in problems if "(feature crp)" in p)
    assert "[data.ehr-database.omop.features]" in crp
    assert '"crp" to [data.ehr-database.omop] not-recorded' in crp
    assert not any("(feature bnp)" in p for p in problems)


def test_a_site_that_records_none_of_the_runs_labels_cannot_train(site, tmp_path):
    labels = list(TASK.labels)
    toml = _without_columns(site, tmp_path, labels)
    _declare(toml, labels)

    code, report = _check(toml)

    assert code != 0 and not report["can_train"]
    assert any("nothing to train on" in b for b in report["blocking"])
