"""Declared EHR schemas: renamed columns, units, ranges, label mapping, problems."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w

from wardround.common.config import TaskConfig
from wardround.common.errors import DataError
from wardround.common.text import get_tokenizer
from wardround.sitedata.dataset import load_site_data
from wardround.sitedata.ehr import EhrStats, encode_batch, open_ehr, schema_problems
from wardround.sitedata.site_config import EhrSchema, SiteConfig
from wardround.synthetic.hospitals import synthesize_federation

TASK = TaskConfig()


def _table(**over) -> pa.Table:
    cols = {
        "MRN": ["p1", "p2", "p3"],
        "StudyKey": ["s1", "s2", "s3"],
        "AGE_M": [900.0, None, 5000.0],  # months: 75 y, missing, 416 y (out of range)
        "TEMP_F": [98.6, 100.4, 150.0],  # 37 C, 38 C, out of the declared range
        "heart_rate": [85, 100, 90],
        "spo2": [0.95, None, 0.9],  # fraction
        "wbc": [9.0, 12.5, 3.0],
        "crp": [3.0, 7.0, None],  # mg/dL
        "bnp": [None, 300.0, 10.0],
        "gender": ["female", "male", "other"],
        "EFF": ["yes", "no", "unknown"],
        "nodule": [1, 0, None],
        "pneumonia": [0, 0, 1],
        "cardiomegaly": [True, False, False],
    }
    cols.update(over)
    return pa.table(cols)


RAW = {
    "patient-id": "MRN",
    "study-uid": "StudyKey",
    "features": {
        "age": {"column": "AGE_M", "unit": "months"},
        "temperature": {"column": "TEMP_F", "unit": "degF", "range": [80, 115]},
        "spo2": {"column": "spo2", "unit": "fraction", "type": "number"},
        "crp": {"column": "crp", "unit": "mg/dL"},
        "sex": {"column": "gender", "map": {"female": "F", "male": "M"}},
    },
    "labels": {"effusion": {"column": "EFF", "positive": ["yes"], "negative": ["no"]}},
}
SCHEMA = EhrSchema.model_validate(RAW)


def test_units_ranges_maps_and_labels_are_applied():
    stats = EhrStats()
    enc = encode_batch(_table(), TASK, SCHEMA, stats)
    names, n = list(TASK.numeric), len(TASK.numeric)
    col = {name: i for i, name in enumerate(names)}
    f = enc.features
    assert f[0, col["age"]] == pytest.approx((75 - 60) / 15)
    assert f[1, col["temperature"]] == pytest.approx((38 - 37.2) / 0.8, abs=1e-5)
    assert f[0, col["spo2"]] == pytest.approx(0.0)  # 0.95 -> 95 % = the mean
    assert f[0, col["crp"]] == pytest.approx(0.0)  # 3 mg/dL = 30 mg/L = the mean
    # missing and out of range are imputed (0) and flagged
    assert f[1, col["age"]] == 0 and f[1, n + col["age"]] == 1
    assert f[2, col["age"]] == 0 and f[2, n + col["age"]] == 1
    assert f[2, n + col["temperature"]] == 1
    np.testing.assert_array_equal(f[:, 2 * n :], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(enc.labels[:, 1], [1, 0, 0])  # effusion
    assert enc.label_null[2, 1] and enc.label_null[2, 0]  # unmapped / null
    assert stats.out_of_range["age"] == 1 and stats.out_of_range["temperature"] == 1
    assert stats.missing["age"] == 1 and stats.unknown_category["sex"] == 1
    assert stats.label_unmapped["effusion"] == 1 and stats.label_null["nodule"] == 1


def test_every_schema_problem_is_reported_at_once(tmp_path):
    bad = _table(wbc=["9", "12", "3"], EFF=[1.5, 0.0, 1.0]).drop_columns(["bnp"])
    schema = EhrSchema.model_validate(
        {
            **RAW,
            "features": {
                **RAW["features"],
                "heart_rate": {"column": "heart_rate", "unit": "furlongs"},
                "sex": {"column": "gender", "map": {"female": "W"}},
            },
            "labels": {
                **RAW["labels"],
                "pneumonia": {"column": "pneumonia", "type": "text"},
            },
        }
    )
    path = tmp_path / "ehr.parquet"
    pq.write_table(bad, path)
    with pytest.raises(DataError) as err:
        open_ehr(path, TASK, schema)
    text = str(err.value)
    for needle in (
        "'bnp'",
        "[ehr.features] bnp",
        "'wbc'",
        "must be numeric",
        "furlongs",
        "bpm",
        "['W']",
        "declared text",
        "1 declared column",
    ):
        assert needle in text, needle
    assert len(schema_problems(bad.schema, TASK, schema)) >= 5


def test_text_label_without_mapping_is_a_problem():
    table = _table(EFF=["yes", "no", "no"])
    schema = EhrSchema.model_validate({**RAW, "labels": {"effusion": "EFF"}})
    problems = schema_problems(table.schema, TASK, schema)
    assert any("positive = [...]" in p for p in problems)


def _labelled(label: str, **spec) -> EhrSchema:
    """The test schema with ``label`` read as ``spec`` says."""
    return EhrSchema.model_validate({**RAW, "labels": {**RAW["labels"], label: spec}})


def test_a_text_label_needs_both_lists_and_reads_neither_as_unknown():
    table = _table(EFF=["positive", "negative", "uncertain"])
    only_positive = _labelled("effusion", column="EFF", positive=["positive"])
    problems = schema_problems(table.schema, TASK, only_positive)
    assert any("`negative = [...]`" in p and "never a negative" in p for p in problems)

    schema = _labelled(
        "effusion", column="EFF", positive=["positive"], negative=["negative"]
    )
    assert not schema_problems(table.schema, TASK, schema)
    encoded = encode_batch(table, TASK, schema, EhrStats())
    k = TASK.labels.index("effusion")
    # 'uncertain' is unknown, not a negative
    assert encoded.label_null[:, k].tolist() == [False, False, True]
    assert encoded.labels[:2, k].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({}, [1.0, 0.0, 0.0]),  # true is positive
        ({"positive": ["true"]}, [1.0, 0.0, 0.0]),  # one list names the other value
        ({"negative": ["true"]}, [0.0, 1.0, 1.0]),  # true when normal
        ({"positive": ["0"], "negative": ["1"]}, [0.0, 1.0, 1.0]),
    ],
)
def test_a_boolean_label_reads_one_list_or_none(mapping, expected):
    schema = _labelled("cardiomegaly", column="cardiomegaly", **mapping)
    table = _table()  # cardiomegaly: True, False, False
    assert not schema_problems(table.schema, TASK, schema)
    encoded = encode_batch(table, TASK, schema, EhrStats())
    k = TASK.labels.index("cardiomegaly")
    assert encoded.labels[:, k].tolist() == expected
    assert not encoded.label_null[:, k].any()


def test_words_for_a_boolean_label_column_are_a_problem():
    schema = _labelled(
        "cardiomegaly", column="cardiomegaly", positive=["yes"], negative=["no"]
    )
    problems = schema_problems(_table().schema, TASK, schema)
    assert any("true/false" in p and "'yes'" in p for p in problems)


def test_words_for_a_numeric_label_column_are_a_problem():
    table = _table(EFF=[0, 1, 1])
    schema = _labelled("effusion", column="EFF", positive=["yes"])
    problems = schema_problems(table.schema, TASK, schema)
    assert any("numeric codes" in p and "'yes'" in p for p in problems)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tmpl")
    synthesize_federation(out, 1, patients_per_site=30, seed=5)
    return out


def _load(site_dir: Path, task: TaskConfig):
    return load_site_data(
        SiteConfig.from_toml(site_dir / "site.toml"),
        task,
        image_size=16,
        max_note_tokens=16,
        tokenizer=get_tokenizer("byte"),
    )


def test_studies_without_images_train_when_the_run_allows(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    strict = _load(site, TASK)
    loose = _load(site, TASK.model_copy(update={"require_image": False}))
    assert loose.num_studies == strict.num_studies + strict.num_unmatched_ehr
    assert loose.num_without_image == strict.num_unmatched_ehr > 0
    present = np.concatenate(
        [loose.train.tensors["present"], loose.validation.tensors["present"]]
    )
    images = np.concatenate(
        [loose.train.tensors["image"], loose.validation.tensors["image"]]
    )
    no_image = present[:, 0] == 0
    assert no_image.sum() == loose.num_without_image
    assert (images[no_image] == 0).all()
    assert strict.num_unmatched_images > 0  # images without EHR row are counted


def test_slices_as_channels_reach_the_items(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    task = TaskConfig.model_validate(
        {**TASK.model_dump(), "slice_mode": "channels", "image_channels": 3}
    )
    data = _load(site, task)
    assert tuple(data.train[0]["image"].shape) == (3, 16, 16)


def test_declared_schema_in_site_toml_loads(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    table = pq.read_table(site / "ehr.parquet")
    temp_f = [
        None if v is None else v * 9 / 5 + 32
        for v in table.column("temperature").to_pylist()
    ]
    table = table.drop_columns(["temperature"]).append_column(
        "TEMP_F", pa.array(temp_f)
    )
    pq.write_table(table, site / "ehr.parquet")
    raw = tomllib.loads((site / "site.toml").read_text())
    raw.setdefault("ehr", {}).setdefault("features", {})["temperature"] = {
        "column": "TEMP_F",
        "unit": "degF",
        "range": [80.0, 115.0],
    }
    (site / "site.toml").write_bytes(tomli_w.dumps(raw).encode())
    before = _load(template / "site-01", TASK)
    after = _load(site, TASK)
    np.testing.assert_allclose(
        after.train.tensors["ehr"], before.train.tensors["ehr"], atol=1e-4
    )


def test_a_unit_column_converts_each_row_and_counts_unknown_units():
    raw = {
        **RAW,
        "features": {
            **RAW["features"],
            "crp": {"column": "crp", "unit-column": "crp_unit"},
        },
    }
    schema = EhrSchema.model_validate(raw)
    table = _table(crp=[3.0, 7.0, 5.0], crp_unit=["mg/dL", "mg/L", "furlong"])
    assert schema_problems(table.schema, TASK, schema) == []
    stats = EhrStats()
    enc = encode_batch(table, TASK, schema, stats)
    j = list(TASK.numeric).index("crp")
    norm = TASK.numeric["crp"]
    expected = [(30.0 - norm.mean) / norm.std, (7.0 - norm.mean) / norm.std]
    assert np.allclose(enc.features[:2, j], expected, atol=1e-5)
    n = len(TASK.numeric)
    assert enc.features[2, j] == 0.0 and enc.features[2, n + j] == 1.0  # missing
    assert stats.unit_unknown == {"crp": 1}
    null_unit = _table(crp=[3.0, None, 1.0], crp_unit=[None, None, "Cel"])
    stats = EhrStats()
    encode_batch(null_unit, TASK, schema, stats)
    assert stats.unit_unknown == {"crp": 2}  # a null unit and a temperature's unit


def test_a_unit_column_is_checked_and_excludes_a_fixed_unit():
    raw = {**RAW, "features": {"crp": {"column": "crp", "unit-column": "crp_unit"}}}
    schema = EhrSchema.model_validate(raw)
    problems = schema_problems(_table().schema, TASK, schema)
    assert any("'crp_unit'" in p and "unit-column" in p for p in problems)
    problems = schema_problems(_table(crp_unit=[1, 2, 3]).schema, TASK, schema)
    assert any("not text" in p for p in problems)
    with pytest.raises(ValueError, match="unit-column"):
        EhrSchema.model_validate(
            {"features": {"crp": {"column": "c", "unit-column": "u", "unit": "mg/L"}}}
        )
