"""What real hospital exports hold: mixed EHR folders, label codes, padded ids, stray
folders in a sites-dir, sites too small to score. Each gets a message or a warning
that says what to fix, never a traceback or a silent change of meaning."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wardround.client.site_check import _data_warnings
from wardround.common.config import TaskConfig
from wardround.common.errors import ConfigError, DataError
from wardround.ops.config_file import read_toml
from wardround.simulations.study.cells import Cell, site_tomls_in
from wardround.simulations.study.goals import _personal_goals
from wardround.sitedata.ehr import EhrStats, encode_batch, schema_problems
from wardround.sitedata.ehr_source import ParquetEhr, open_dataset
from wardround.sitedata.site_config import EhrSchema

TASK = TaskConfig()


def _rows(**over) -> pa.Table:
    cols = {
        "patient_id": ["p1", "p2"],
        "study_uid": ["1.2.1", "1.2.2"],
        "crp": [3.0, 4.0],
    }
    cols.update(over)
    return pa.table(cols)


def _read_all(path: Path) -> int:
    return sum(b.num_rows for b in ParquetEhr(path).batches(["crp"], 1024))


def test_a_later_ehr_file_with_text_in_a_number_column_is_named(tmp_path):
    folder = tmp_path / "ehr"
    folder.mkdir()
    pq.write_table(_rows(), folder / "2024-01.parquet")
    pq.write_table(_rows(crp=["5.5 mg/L", "3"]), folder / "2024-02.parquet")
    with pytest.raises(DataError) as err:
        _read_all(folder)
    assert "2024-02.parquet" in str(err.value)
    assert "another type" in str(err.value)
    assert "5.5" not in str(err.value)  # a cell's value never reaches the message


@pytest.mark.parametrize("stray", ["README.txt", "zz-notes.txt"])
def test_a_file_that_is_not_parquet_in_an_ehr_folder_is_named(tmp_path, stray):
    # README.txt sorts before the data file (read for the schema), zz-... after it
    folder = tmp_path / "ehr"
    folder.mkdir()
    pq.write_table(_rows(), folder / "part-0.parquet")
    (folder / stray).write_text("exported by the EHR team\n")
    with pytest.raises(DataError) as err:
        open_dataset(folder)
        _read_all(folder)
    assert stray in str(err.value) and "not a Parquet file" in str(err.value)


def test_ehr_folders_that_agree_still_read_every_row(tmp_path):
    folder = tmp_path / "ehr"
    folder.mkdir()
    pq.write_table(_rows(), folder / "a.parquet")
    pq.write_table(_rows(crp=[1, 2]), folder / "b.parquet")  # int where float: castable
    assert _read_all(folder) == 4


def _full_rows(n: int, **over) -> pa.Table:
    """Every column the default schema reads, ``n`` rows."""
    cols: dict = {
        "patient_id": [f"p{i}" for i in range(n)],
        "study_uid": [f"1.2.{i}" for i in range(n)],
        **{name: [1.0] * n for name in TASK.numeric},
        **{name: [values[0]] * n for name, values in TASK.categorical.items()},
        **{name: [0] * n for name in TASK.labels},
        "note": ["no effusion"] * n,
    }
    cols.update(over)
    return pa.table(cols)


def test_numeric_label_codes_other_than_0_and_1_are_unmapped_not_positive():
    # -1: uncertain (CheXpert), 2: another class
    table = _full_rows(4, pneumonia=[1, 0, -1, 2])
    stats = EhrStats()
    enc = encode_batch(table, TASK, EhrSchema(), stats)
    k = list(TASK.labels).index("pneumonia")
    np.testing.assert_array_equal(enc.labels[:, k], [1, 0, 0, 0])
    np.testing.assert_array_equal(enc.label_null[:, k], [False, False, True, True])
    assert stats.label_unmapped["pneumonia"] == 2
    assert stats.label_positive["pneumonia"] == 1


def test_padded_patient_ids_and_study_uids_are_one_key():
    table = _full_rows(2, patient_id=[" p1", "p1 "], study_uid=["1.2.1 ", "  "])
    enc = encode_batch(table, TASK, EhrSchema(), EhrStats())
    assert enc.patient_ids == ["p1", "p1"]
    assert enc.study_uids == ["1.2.1", None]  # a blank UID is no UID


def _report(**ehr) -> dict:
    base = {
        "rows": 100,
        "label_prevalence": {"effusion": 0.3},
        "label_examples": {"effusion": {"positive": 30, "negative": 70}},
        "missing_fraction": {},
        "label_null": {},
        "label_unmapped": {},
        "out_of_range": {},
        "unknown_category": {},
        "rows_without_keys": 0,
        "duplicate_study_rows": 0,
    }
    base.update(ehr)
    dicom = {"duplicate_instances": 0, "pydicom_warnings": {}, "decode_failures": {}}
    join = {"dicom_studies": 10, "dicom_studies_with_ehr": 10}
    return {"ehr": base, "dicom": dicom, "join": join}


def test_a_clean_site_gets_no_warning():
    assert _data_warnings(_report()) == []


def test_site_check_warns_about_values_that_train_differently_than_they_read():
    found = "\n".join(
        _data_warnings(
            _report(
                label_prevalence={"effusion": 1.0},
                label_examples={"effusion": {"positive": 93, "negative": 0}},
                label_null={"effusion": 7},
                label_unmapped={"effusion": 5},
                out_of_range={"age": 97, "temperature": 2},
                unknown_category={"sex": 4},
                rows_without_keys=3,
                duplicate_study_rows=6,
                missing_fraction={"bnp": 1.0, "crp": 0.1},
            )
        )
    )
    assert "feature 'bnp' is missing in 100% of rows" in found and "crp" not in found
    assert "label 'effusion' has no negative example" in found
    assert "5 value(s) are neither 0/1" in found and "-1 for uncertain" in found
    assert "empty in 2 row(s)" in found
    assert "feature 'age': 97 of 100" in found and "unit" in found
    assert "temperature" not in found  # 2 % out of range: noise, not a unit problem
    assert "feature 'sex': 4 value(s)" in found
    assert "3 EHR row(s) have no patient id" in found
    assert "6 EHR row(s) repeat another row's study UID" in found


def test_repeated_study_rows_whose_labels_disagree_are_counted_and_warned():
    from wardround.sitedata.join import join_ehr_images

    table = _full_rows(
        4,
        study_uid=["1.2.1", "1.2.1", "1.2.2", "1.2.2"],
        pneumonia=[0, 1, 1, None],  # study 1.2.1 disagrees; 1.2.2 only lacks a value
    )
    encoded = encode_batch(table, TASK, EhrSchema(), EhrStats())

    join = join_ehr_images(encoded, {}, require_image=False)

    assert join.duplicates == 2 and join.conflicting == 1
    found = " ".join(
        _data_warnings(
            _report(duplicate_study_rows=2, studies_with_conflicting_labels=1)
        )
    )
    assert "1 of those stud(ies) have rows whose labels disagree" in found


def test_one_class_warnings_read_counts_not_the_rounded_prevalence():
    rare = _report(
        label_prevalence={"effusion": 0.0},  # 1 in 20,001, rounded
        label_examples={"effusion": {"positive": 1, "negative": 20_000}},
    )
    assert not any("no positive" in w for w in _data_warnings(rare))
    unknown = _report(label_examples={"effusion": {"positive": 0, "negative": 0}})
    (found,) = _data_warnings(unknown)
    assert "label 'effusion' is unknown in every row" in found


def test_site_check_warns_when_the_validation_split_cannot_score_a_label():
    report = _report()
    report["validation"] = {
        "patients": 2,
        "train_patients": 8,
        "items": 3,
        "labels": {
            "effusion": {"positive": 0, "negative": 3},
            "nodule": {"positive": 1, "negative": 2},
        },
    }
    found = "\n".join(_data_warnings(report))
    assert "label 'effusion': the validation split (2 patient(s)) holds 0 positive" in (
        found
    )
    assert "nodule" not in found and "validation-fraction" in found


def test_site_check_warns_about_images_without_an_ehr_row():
    report = _report()
    report["join"] = {"dicom_studies": 80, "dicom_studies_with_ehr": 40}
    assert any(
        "40 DICOM stud(ies) have no EHR row" in w for w in _data_warnings(report)
    )


def _site(folder: Path, name: str, toml: str = "site.toml") -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / toml).write_text("[site]\n")


def test_a_sites_dir_names_the_folders_it_leaves_out(tmp_path, caplog):
    for name in ("site-01", "site-02"):
        _site(tmp_path, name)
    (tmp_path / "archive").mkdir()
    (tmp_path / ".snapshots").mkdir()
    (tmp_path / "README.txt").write_text("")
    with caplog.at_level(logging.WARNING):
        tomls = site_tomls_in(tmp_path)
    assert [t.parent.name for t in tomls] == ["site-01", "site-02"]
    assert "archive" in caplog.text and ".snapshots" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        site_tomls_in(tmp_path)  # every arm asks again: said once
    assert "archive" not in caplog.text


def test_a_misnamed_site_toml_is_refused_not_skipped(tmp_path):
    for name in ("site-01", "site-02"):
        _site(tmp_path, name)
    _site(tmp_path, "site-03", toml="Site.toml")
    with pytest.raises(ConfigError) as err:
        site_tomls_in(tmp_path)
    assert "Site.toml" in str(err.value) and "case-sensitive" in err.value.hint


def test_a_site_too_small_to_score_is_left_out_of_per_site_goals_not_failed():
    def per_site(**values):
        return {"per_site": {s: {"mean": v} for s, v in values.items()}, "seeds": [0]}

    arms = {
        "fedavg": per_site(a=0.70, b=0.80, c=math.nan),
        "local": per_site(a=0.65, b=0.75, c=math.nan),
        "personal": per_site(a=0.72, b=0.78, c=math.nan),
    }
    plan = {
        "personal": SimpleNamespace(
            name="personal", label="own head", personalised=True
        )
    }
    (goal,) = _personal_goals(Cell(200, 3, "random"), arms, plan, {})
    assert "1 of 2 sites" in goal.measured
    assert "-0.020 (b)" in goal.measured and "nan" not in goal.measured
    assert "not measurable, left out: c" in goal.measured


def test_a_feature_null_in_every_row_is_missing_not_a_wrong_type():
    table = _full_rows(3, bnp=pa.nulls(3))
    assert not [
        p for p in schema_problems(table.schema, TASK, EhrSchema()) if "bnp" in p
    ]
    stats = EhrStats()
    encode_batch(table, TASK, EhrSchema(), stats)
    assert stats.missing["bnp"] == 3


def test_a_label_category_or_note_empty_in_every_row_is_unknown_not_a_problem():
    # a column of an export that no study filled has Arrow type null
    table = _full_rows(3, nodule=pa.nulls(3), sex=pa.nulls(3), note=pa.nulls(3))
    assert not schema_problems(table.schema, TASK, EhrSchema())
    stats = EhrStats()
    encoded = encode_batch(table, TASK, EhrSchema(), stats)
    assert stats.label_null["nodule"] == 3 and stats.label_unmapped["nodule"] == 0
    assert encoded.notes == ["", "", ""]


def test_a_folder_whose_first_file_has_a_column_empty_reads_the_later_numbers(
    tmp_path,
):
    folder = tmp_path / "ehr"
    folder.mkdir()
    pq.write_table(_rows(crp=pa.nulls(2)), folder / "2023-01.parquet")
    pq.write_table(_rows(crp=[5.5, 3.0]), folder / "2023-02.parquet")

    batches = list(ParquetEhr(folder).batches(["crp"], 1024))

    values = [v for b in batches for v in b.column("crp").to_pylist()]
    assert values == [None, None, 5.5, 3.0]
    assert pa.types.is_floating(open_dataset(folder).schema.field("crp").type)
    # whole numbers one month, 5.5 the next: the type that holds both
    pq.write_table(_rows(crp=[1, 2]), folder / "2023-02.parquet")
    pq.write_table(_rows(crp=[5.5, 3.0]), folder / "2023-03.parquet")
    values = [
        v
        for b in ParquetEhr(folder).batches(["crp"], 1024)
        for v in b["crp"].to_pylist()
    ]
    assert values == [None, None, 1.0, 2.0, 5.5, 3.0]


def test_a_unit_column_empty_in_every_row_is_no_problem():
    schema = EhrSchema.model_validate(
        {"features": {"crp": {"column": "crp", "unit-column": "crp_unit"}}}
    )
    table = _full_rows(2, crp=pa.nulls(2)).append_column("crp_unit", pa.nulls(2))
    assert not [p for p in schema_problems(table.schema, TASK, schema) if "crp" in p]


def test_numbers_written_with_units_are_refused_with_how_to_write_them():
    table = _full_rows(1, crp=["5.5 mg/L"])
    (problem,) = [
        p for p in schema_problems(table.schema, TASK, EhrSchema()) if "crp" in p
    ]
    assert "write it as numbers" in problem and "`unit`" in problem


def test_a_site_toml_saved_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "site.toml"
    path.write_bytes(b"\xef\xbb\xbf[site]\r\nname = 'north'\r\n")
    assert read_toml(path) == {"site": {"name": "north"}}
    path.write_bytes(b"[site]\nname = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_toml(path)


def test_a_label_value_both_positive_and_negative_is_refused():
    with pytest.raises(ValueError, match="'1' is listed as both positive and negative"):
        EhrSchema.model_validate(
            {
                "labels": {
                    "pneumonia": {
                        "column": "p",
                        "positive": ["1"],
                        "negative": ["1", "0"],
                    }
                }
            }
        )


def test_site_check_names_a_mapping_the_run_does_not_have():
    from wardround.client.site_check import _names_the_run_lacks
    from wardround.sitedata.site_config import SiteConfig

    site = SiteConfig.model_validate(
        {
            "site": {"name": "a"},
            "ehr": {
                "features": {"temprature": {"column": "temp", "unit": "degF"}},
                "labels": {"effusion": "EFF"},
            },
        }
    )
    (found,) = _names_the_run_lacks(site, TASK)
    assert "[ehr.features] maps 'temprature'" in found and "temperature" in found


def test_a_numeric_label_with_only_positive_declared_leaves_other_codes_unmapped():
    from wardround.sitedata.ehr import _label_values

    got = _label_values(pa.array([1, 0, -1, None, 2]), ("1",), ())
    np.testing.assert_array_equal(got, [1.0, 0.0, np.nan, np.nan, np.nan])
    declared = _label_values(pa.array([1, 0, -1]), ("1",), ("0", "-1"))
    np.testing.assert_array_equal(declared, [1.0, 0.0, 0.0])


def test_site_check_warns_when_validation_outweighs_training():
    report = _report()
    report["validation"] = {
        "patients": 18,
        "train_patients": 1,
        "items": 18,
        "labels": {},
    }
    (found,) = _data_warnings(report)
    assert "training split holds 1 patient(s)" in found
    assert "validation-fraction" in found


def test_an_empty_ehr_table_is_named_as_such():
    from wardround.client.site_check import _join_blocking
    from wardround.sitedata.site_config import SiteConfig

    report = _report(rows=0)
    report["join"] = {"items": 0, "patients": 0, "items_with_image": 0}
    site = SiteConfig.model_validate({"site": {"name": "a"}})
    (found,) = _join_blocking(report, site, TASK)
    assert found.startswith("the EHR table has no rows")


def test_a_dicom_dir_that_is_a_file_says_so(tmp_path):
    from wardround.sitedata.dicom_index import not_folders

    (tmp_path / "ehr.parquet").write_bytes(b"x")
    found = not_folders([tmp_path / "ehr.parquet", tmp_path / "gone", tmp_path])
    assert found == [
        f"{tmp_path / 'ehr.parquet'} (a file, not a folder)",
        f"{tmp_path / 'gone'} (not found)",
    ]


def test_a_folder_given_as_a_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        read_toml(tmp_path)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"site": {"name": " "}}, "name is empty"),
        ({"data": {"dicom-dirs": ["dicom", ""]}}, "dicom-dirs holds an empty path"),
    ],
)
def test_site_toml_blanks_are_refused(tmp_path, raw, says):
    import tomli_w

    from wardround.sitedata.site_config import SiteConfig

    toml = tmp_path / "site.toml"
    toml.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match=says):
        SiteConfig.from_toml(toml)


def test_a_sites_dir_that_is_one_site_says_so(tmp_path):
    (tmp_path / "site.toml").write_text('[site]\nname = "a"\n')
    with pytest.raises(ConfigError) as info:
        site_tomls_in(tmp_path)
    assert "is itself a site" in (info.value.hint or "")


def test_a_csv_export_is_refused_with_how_to_convert_it(tmp_path):
    csv = tmp_path / "ehr.csv"
    csv.write_text("patient_id,study_uid\np1,1.2.3\n")
    with pytest.raises(DataError) as err:
        open_dataset(csv)
    hint = err.value.hint
    assert "read_csv('ehr.csv'" in hint and "'ehr.parquet'" in hint
    assert "'patient_id': pa.string()" in hint  # ids stay text: '000123' is not 123
