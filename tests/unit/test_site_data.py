"""A site's data path: DICOM index, image maths, EHR encoding, join, split, items."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import tomli_w
import torch

from wardround.common.config import TaskConfig
from wardround.common.errors import DataError
from wardround.common.text import get_tokenizer
from wardround.sitedata import dataset as dataset_mod
from wardround.sitedata import dicom_index
from wardround.sitedata.dataset import load_site_data, split_patients
from wardround.sitedata.dicom_index import index_dicom
from wardround.sitedata.ehr import encode_ehr, read_ehr
from wardround.sitedata.image import (
    CT_DEFAULT_WINDOW,
    dataset_to_image,
    declared_window,
    load_image,
    to_unit,
    window,
)
from wardround.sitedata.site_config import EhrSchema, SiteConfig
from wardround.synthetic.dicom import Encoded, Study, build_dataset, make_uid
from wardround.synthetic.hospitals import synthesize_federation

TASK = TaskConfig()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("template")
    synthesize_federation(out, 2, patients_per_site=36, seed=2)
    return out


@pytest.fixture
def site_dir(template, tmp_path) -> Path:
    """A private copy of site-01 (default column names), safe to modify."""
    target = tmp_path / "site"
    shutil.copytree(template / "site-01", target)
    return target


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _load(site_dir: Path, **kw):
    site = SiteConfig.from_toml(site_dir / "site.toml")
    return load_site_data(
        site,
        TASK,
        image_size=kw.get("image_size", 32),
        max_note_tokens=kw.get("max_note_tokens", 48),
        tokenizer=get_tokenizer("byte"),
    )


# -- index ------------------------------------------------------------------------
def test_index_is_incremental(site_dir, monkeypatch):
    reads: list[Path] = []
    real = dicom_index._read_header

    def counting(path, size, mtime_ns):
        reads.append(path)
        return real(path, size, mtime_ns)

    monkeypatch.setattr(dicom_index, "_read_header", counting)
    folders, cache = [site_dir / "dicom"], site_dir / ".cache"
    first = index_dicom(folders, cache)
    assert first.num_rows == 36 and len(reads) == 36
    assert (cache / dicom_index.INDEX_FILE).is_file()

    reads.clear()
    assert index_dicom(folders, cache).equals(first)
    assert reads == []

    files = _files(site_dir / "dicom")
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    added = files[1].parent / "copy-of-one"
    shutil.copyfile(files[1], added)
    files[2].unlink()
    reads.clear()
    table = index_dicom(folders, cache)
    assert sorted(reads) == sorted([files[0].resolve(), added.resolve()])
    paths = table.column("path").to_pylist()
    assert table.num_rows == 36 and str(files[2].resolve()) not in paths
    assert str(added.resolve()) in paths


def test_index_records_bad_files_with_a_reason(site_dir):
    files = _files(site_dir / "dicom")
    (site_dir / "dicom" / "README.txt").write_text("exported by PACS")
    data = files[0].read_bytes()
    (site_dir / "dicom" / "cut.dcm").write_bytes(data[: len(data) - 4000])
    (site_dir / "dicom" / "cut-header.dcm").write_bytes(data[:400])
    table = index_dicom([site_dir / "dicom"], site_dir / ".cache")
    status = dict(
        zip(
            (Path(p).name for p in table.column("path").to_pylist()),
            table.column("status").to_pylist(),
            strict=True,
        )
    )
    assert status["README.txt"].startswith("not DICOM")
    assert "truncated" in status["cut.dcm"]
    assert status["cut-header.dcm"] != "ok"
    assert table.column("status").to_pylist().count("ok") == 36
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    assert all(uid.startswith("2.25.") for uid in ok.column("study_uid").to_pylist())
    assert set(ok.column("rows").to_pylist()) == {128}


def test_missing_dicom_folder_names_folder_and_key(tmp_path):
    with pytest.raises(DataError) as err:
        index_dicom([tmp_path / "no-such-pacs"], tmp_path / "cache")
    assert "no-such-pacs" in str(err.value) and "data.dicom-dirs" in str(err.value)


# -- image maths ----------------------------------------------------------------------
def test_window_closed_form():
    c, w = 40.0, 400.0
    x = np.array([c - w, c - w / 2, c, c + w / 4, c + w / 2, c + w])
    np.testing.assert_allclose(window(x, c, w), [0, 0, 0.5, 0.75, 1, 1], atol=1e-6)
    assert window(x, c, w).dtype == np.float32


def _dataset(
    stored: np.ndarray, modality="CR", photometric="MONOCHROME2", rescale=None, win=None
) -> pydicom.Dataset:
    study = Study(
        "P",
        "A^B",
        "F",
        "19500101",
        70,
        make_uid("s"),
        make_uid("se"),
        make_uid("so"),
        "ACC1",
        "20240101",
        "120000",
        modality,
        "CHEST",
        "H",
    )
    bits = 16 if stored.dtype == np.int16 else 12
    enc = Encoded(stored, photometric, bits, rescale, win, 1.0)
    ds = build_dataset(study, enc)
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))


def _bytes(ds) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_monochrome1_is_inverted():
    stored = np.tile(np.linspace(0, 4000, 16, dtype=np.uint16), (16, 1))
    m2 = dataset_to_image(_dataset(stored), 16)
    m1 = dataset_to_image(_dataset(stored, photometric="MONOCHROME1"), 16)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-5)
    assert m2[:, -1].mean() > 0.9 and m1[:, -1].mean() < 0.1


def test_declared_window_first_value_and_ct_defaults():
    stored = np.full((8, 8), 1024 - 400, dtype=np.int16)  # -400 HU
    multi = _dataset(
        stored, "CT", rescale=(1.0, -1024.0), win=([-600.0, 40.0], [1500.0, 400.0])
    )
    assert declared_window(multi) == (-600.0, 1500.0)
    bare = _dataset(stored, "CT", rescale=(1.0, -1024.0), win=None)
    assert declared_window(bare) is None
    hu = pydicom.pixels.apply_modality_lut(bare.pixel_array, bare)
    expected = (
        -400 - (CT_DEFAULT_WINDOW[0] - CT_DEFAULT_WINDOW[1] / 2)
    ) / CT_DEFAULT_WINDOW[1]
    np.testing.assert_allclose(to_unit(hu, bare), expected, atol=1e-6)
    img = dataset_to_image(multi, 4)
    np.testing.assert_allclose(img, (-400 + 600 + 750) / 1500, atol=1e-5)


def test_load_image_from_synthetic_file(site_dir):
    image = load_image(_files(site_dir / "dicom")[0], 24)
    assert image.shape == (24, 24) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05


# -- EHR ----------------------------------------------------------------------
def test_encode_ehr_normalises_and_flags_missing():
    table = pa.table(
        {
            "patient_id": ["p1", "p2"],
            "study_uid": ["s1", "s2"],
            "note": ["cough", None],
            "age": [75.0, None],
            "temperature": [37.2, 38.0],
            "heart_rate": [85, 100],
            "spo2": [95.0, None],
            "wbc": [9.0, 12.5],
            "crp": [30.0, 70.0],
            "bnp": [None, 300.0],
            "sex": ["F", "X"],
            "nodule": [1, None],
            "effusion": [0, 1],
            "pneumonia": [0, 0],
            "cardiomegaly": [1, 0],
        }
    )
    enc = encode_ehr(table, TASK, EhrSchema())
    f = enc.features
    assert f.shape == (2, TASK.ehr_width) and f.dtype == np.float32
    names = list(TASK.numeric)
    n = len(names)
    assert f[0, names.index("age")] == pytest.approx(1.0)  # (75 - 60) / 15
    assert f[1, names.index("temperature")] == pytest.approx(1.0)  # (38 - 37.2) / 0.8
    assert f[1, names.index("age")] == 0.0 and f[1, n + names.index("age")] == 1.0
    assert f[0, n + names.index("bnp")] == 1.0 and f[0, n + names.index("age")] == 0.0
    np.testing.assert_array_equal(f[:, 2 * n :], [[1, 0, 0], [0, 0, 1]])  # F, unknown
    np.testing.assert_array_equal(enc.labels, [[1, 0, 0, 1], [0, 1, 0, 0]])
    assert enc.null_labels == 1 and enc.notes == ["cough", ""]


def test_missing_columns_are_all_listed(site_dir):
    toml = site_dir / "site.toml"
    raw = tomllib.loads(toml.read_text())
    raw["ehr"]["patient-id"] = "MRN_X"
    raw["ehr"]["features"] = {"age": "AGE_X", "bnp": "BNP_X"}
    raw["ehr"]["labels"] = {"nodule": "NOD_X"}
    toml.write_bytes(tomli_w.dumps(raw).encode())
    site = SiteConfig.from_toml(toml)
    with pytest.raises(DataError) as err:
        read_ehr(site.ehr_path, TASK, site.ehr)
    text = str(err.value)
    for needle in (
        "MRN_X",
        "AGE_X",
        "BNP_X",
        "NOD_X",
        "[ehr] patient-id",
        "[ehr.features] age",
        "[ehr.features] bnp",
        "[ehr.labels] nodule",
        "4 declared column",
        "The table has columns",
        "study_uid",
    ):
        assert needle in text


def test_missing_ehr_file_names_key(site_dir):
    (site_dir / "ehr.parquet").unlink()
    with pytest.raises(DataError, match="data.ehr"):
        _load(site_dir)


# -- join, split, items -------------------------------------------------------------
def test_join_counts_unmatched_both_ways(site_dir):
    ehr = pq.read_table(site_dir / "ehr.parquet")
    ehr_uids = set(ehr.column("study_uid").to_pylist())
    dicom_uids = {
        pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
        for p in _files(site_dir / "dicom")
    }
    data = _load(site_dir)
    assert (
        data.num_studies
        == len(ehr_uids & dicom_uids)
        == len(data.train) + len(data.validation)
    )
    assert data.num_unmatched_ehr == len(ehr_uids - dicom_uids) > 0
    assert data.num_unmatched_images == len(dicom_uids - ehr_uids) > 0
    assert len(data.fingerprint) == 64


def test_items_have_the_contract_shapes_and_dtypes(site_dir):
    data = _load(site_dir, image_size=32, max_note_tokens=48)
    item = data.train[0]
    expected = {
        "image": ((1, 32, 32), "float32"),
        "ehr": ((TASK.ehr_width,), "float32"),
        "note_ids": ((48,), "int64"),
        "note_mask": ((48,), "int64"),
        "note_ngrams": ((256,), "int64"),
        "labels": ((len(TASK.labels),), "float32"),
        "label_known": ((len(TASK.labels),), "float32"),
        "present": ((3,), "float32"),
    }
    assert set(item) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert (
            tuple(item[key].shape) == shape and str(item[key].dtype) == f"torch.{dtype}"
        )
    all_present = data.train.tensors["present"]
    assert set(all_present.unique().tolist()) <= {0.0, 1.0}
    assert all_present[:, 0].min() == 1  # every synthetic image decodes
    notes_present = all_present[:, 2].bool()
    assert (~notes_present).any() and notes_present.any()  # some empty notes
    mask = data.train.tensors["note_mask"]
    assert (mask[notes_present].sum(1) > 2).all()
    ngrams = data.train.tensors["note_ngrams"]
    assert ((ngrams > 0).sum(1)[notes_present] > 0).all()
    assert (ngrams[~notes_present] == 0).all()
    assert (
        0.0 <= data.train.tensors["image"].min()
        and data.train.tensors["image"].max() <= 1
    )


def test_split_is_deterministic_and_patient_disjoint():
    patients = [f"p{i // 2}" for i in range(200)]  # two studies per patient
    a = split_patients(patients, 7, 0.25)
    assert (a == split_patients(patients, 7, 0.25)).all()
    for i in range(0, 200, 2):
        assert a[i] == a[i + 1]
    assert 0.1 < a.mean() < 0.4
    assert (a != split_patients(patients, 8, 0.25)).any()
    assert split_patients(["x", "y"], 0, 0.01).sum() == 1  # both sides non-empty


def test_load_is_reproducible_and_reuses_the_image_cache(site_dir, monkeypatch):
    first = _load(site_dir)
    cached = list((site_dir / ".wardround-cache").glob("images-*-32.npy"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("DICOM decoded again despite the cache")

    monkeypatch.setattr(dataset_mod, "load_study_image", no_decoding)
    second = _load(site_dir)
    assert second.fingerprint == first.fingerprint
    for key in first.train.tensors:
        assert (first.train.tensors[key] == second.train.tensors[key]).all()
    assert len(first.validation) == len(second.validation) > 0


def test_fingerprint_changes_with_the_ehr(site_dir):
    before = _load(site_dir).fingerprint
    table = pq.read_table(site_dir / "ehr.parquet")
    crp = pa.array(
        [None if v is None else v + 1.0 for v in table.column("crp").to_pylist()]
    )
    pq.write_table(
        table.set_column(table.schema.get_field_index("crp"), "crp", crp),
        site_dir / "ehr.parquet",
    )
    assert _load(site_dir).fingerprint != before


def test_an_empty_label_cell_is_unknown_not_a_negative(site_dir):
    table = pq.read_table(site_dir / "ehr.parquet")
    zeros = table.column("effusion").to_pylist()
    blank = [i for i, v in enumerate(zeros) if v == 0][:3]
    zeros_before = _load(site_dir)
    values = [None if i in blank else v for i, v in enumerate(zeros)]
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("effusion"), "effusion", pa.array(values)
        ),
        site_dir / "ehr.parquet",
    )
    data = _load(site_dir)
    k = TASK.labels.index("effusion")
    known = torch.cat([d.tensors["label_known"] for d in (data.train, data.validation)])
    # a blanked row whose study has no image is not an item
    unknown = int((known == 0).sum())
    assert 1 <= unknown <= 3 and int((known[:, k] == 0).sum()) == unknown
    assert data.num_null_labels == unknown
    # a 0 that becomes unknown is other data: the run's manifest must tell them apart
    assert data.fingerprint != zeros_before.fingerprint


def test_fingerprint_covers_the_studies_used_not_the_rest_of_the_folder(site_dir):
    import pydicom

    before = _load(site_dir).fingerprint
    # a study no EHR row names (a PACS is never asked for it): same data, same print
    source = _files(site_dir / "dicom")[0]
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "2.25.1234567"
    ds.SOPInstanceUID = "2.25.1234568"
    (site_dir / "dicom" / "unrelated").mkdir()
    ds.save_as(site_dir / "dicom" / "unrelated" / "1.dcm")
    assert _load(site_dir).fingerprint == before
    # an image of a study that trains: another print
    with source.open("ab") as handle:
        handle.write(b"\0\0")
    assert _load(site_dir).fingerprint != before


def test_renamed_site_loads_through_its_mapping(template):
    data = _load(template / "site-02")
    assert data.num_studies > 25
    assert data.train.tensors["labels"].sum() > 0


def test_no_matching_study_is_a_data_error(site_dir):
    table = pq.read_table(site_dir / "ehr.parquet")
    fake = pa.array([f"9.9.{i}" for i in range(table.num_rows)])
    pq.write_table(table.set_column(1, "study_uid", fake), site_dir / "ehr.parquet")
    with pytest.raises(DataError, match="study-uid"):
        _load(site_dir)


def test_training_notes_the_studies_it_took_without_their_image(site_dir):
    """The note `wardround simulate` prints: counts and fixed reasons only."""
    import time

    from wardround.sitedata import decode
    from wardround.sitedata.data_notes import describe_data_notes, read_data_notes

    for path in [p for p in _files(site_dir / "dicom") if p.suffix == ".dcm"][:2]:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = "7.77", 0
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(b"7.77", b"abc "))
    before = time.time()
    data = _load(site_dir)
    site = SiteConfig.from_toml(site_dir / "site.toml")

    note = read_data_notes(site.cache_path, before)
    assert note is not None and note["image_failures"] == {decode.DISPLAY_ERROR: 2}
    assert note["studies"] == data.num_studies and data.num_image_errors == 2
    [line] = describe_data_notes("site-01", note)
    assert line.startswith(f"site-01: 2 of {data.num_studies} studies trained without")
    assert read_data_notes(site.cache_path, time.time() + 60) is None  # older: unsaid
