"""Synthetic hospitals: valid DICOM, joinable EHR, parseable site.toml, reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from wardround.common.config import TaskConfig
from wardround.common.errors import ConfigError
from wardround.sitedata.ehr import read_ehr
from wardround.sitedata.site_config import SiteConfig
from wardround.synthetic.dicom import SOP_CLASS
from wardround.synthetic.hospitals import synthesize_federation


def _files(site_dir: Path) -> list[Path]:
    return sorted(p for p in (site_dir / "dicom").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("fed")
    return synthesize_federation(out, 3, patients_per_site=30, seed=1)


def test_returns_one_site_toml_per_site(federation):
    assert [p.parent.name for p in federation] == ["site-01", "site-02", "site-03"]
    assert all(p.name == "site.toml" and p.is_file() for p in federation)


def test_dicom_files_reread_with_consistent_tags(federation):
    modalities = set()
    for toml in federation:
        files = _files(toml.parent)
        assert len(files) == 30
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == SOP_CLASS[ds.Modality]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
                assert uid.startswith("2.25.") and len(uid) <= 64
            pixels = ds.pixel_array
            assert pixels.shape == (128, 128) == (ds.Rows, ds.Columns)
            assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16
            assert ds.HighBit == ds.BitsStored - 1
            assert (pixels.dtype == np.int16) == (ds.PixelRepresentation == 1)
            assert int(pixels.max()) < 2**ds.BitsStored
            assert ds.BodyPartExamined in ("CHEST", "THORAX")
            assert ds.PatientID and str(ds.PatientName)
            modalities.add(ds.Modality)
    assert {"CT", "MR"} <= modalities and modalities & {"CR", "DX"}


def test_layouts_vary_and_one_site_has_no_extension(federation):
    suffixes = [{p.suffix for p in _files(t.parent)} for t in federation]
    assert {""} in suffixes and {".dcm"} in suffixes
    depths = {
        len(p.relative_to(t.parent).parts)
        for t in federation
        for p in _files(t.parent)[:1]
    }
    assert len(depths) > 1


def test_ct_rescale_gives_hounsfield_units(federation):
    found = 0
    for toml in federation:
        for path in _files(toml.parent):
            ds = pydicom.dcmread(path)
            if ds.Modality != "CT":
                continue
            found += 1
            assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
            hu = apply_modality_lut(ds.pixel_array, ds)
            assert -1100 <= hu.min() and hu.max() <= 1500
            assert (hu < -600).mean() > 0.2  # air and lungs
            assert (np.abs(hu) < 150).mean() > 0.2  # soft tissue
    assert found > 0


def test_some_cr_files_are_monochrome1_and_inverted(federation):
    mono1 = [pydicom.dcmread(p) for p in _files(federation[1].parent)]
    mono1 = [ds for ds in mono1 if ds.PhotometricInterpretation == "MONOCHROME1"]
    assert mono1, "site-02 should store some CR as MONOCHROME1"
    ds = mono1[0]
    corner = ds.pixel_array[:6, :6].astype(float).mean()  # air: white stored value
    centre = ds.pixel_array[60:68, 60:68].astype(float).mean()
    assert corner > centre


def test_renamed_columns_site_maps_correctly(federation):
    site = SiteConfig.from_toml(federation[1])
    assert site.ehr.patient_id == "mrn" and site.ehr.study_uid == "accession_study_uid"
    assert site.ehr.feature_column("age") == "AGE_YEARS"
    assert site.ehr.label_column("effusion") == "finding_effusion"
    table = read_ehr(site.ehr_path, TaskConfig(), site.ehr)
    assert "AGE_YEARS" in table.column_names and "age" not in table.column_names
    default = SiteConfig.from_toml(federation[0])
    assert default.ehr.feature_column("age") == "age"
    assert "age" in read_ehr(default.ehr_path, TaskConfig(), default.ehr).column_names


def test_site_toml_paths_resolve(federation):
    for toml in federation:
        site = SiteConfig.from_toml(toml)
        assert site.site.name == toml.parent.name
        assert all(p.is_dir() for p in site.dicom_paths)
        assert site.ehr_path.is_file()
        assert site.cache_path.parent == toml.parent


def test_join_has_unmatched_rows_both_ways_and_missing_values(federation):
    site = SiteConfig.from_toml(federation[0])
    table = pq.read_table(site.ehr_path)
    ehr_uids = set(table.column("study_uid").to_pylist())
    dicom_uids = {
        pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
        for p in _files(federation[0].parent)
    }
    assert ehr_uids - dicom_uids and dicom_uids - ehr_uids
    assert len(ehr_uids & dicom_uids) >= 25
    nulls = sum(
        table.column(c).null_count for c in ("temperature", "crp", "bnp", "wbc")
    )
    assert nulls > 0
    notes = table.column("note").to_pylist()
    assert any(n in ("", None) for n in notes) and any(n for n in notes)
    for label in TaskConfig().labels:
        assert set(table.column(label).to_pylist()) <= {0, 1}


def _snapshot(root: Path) -> tuple[bytes, list[tuple[str, str, bytes]]]:
    site = root / "site-02"
    ehr = (site / "ehr.parquet").read_bytes()
    dicoms = []
    for path in _files(site):
        ds = pydicom.dcmread(path)
        dicoms.append((str(path.relative_to(site)), ds.SOPInstanceUID, ds.PixelData))
    return ehr, dicoms


def test_same_seed_is_reproducible_and_other_seed_differs(tmp_path):
    a = _snapshot(
        synthesize_federation(tmp_path / "a", 2, patients_per_site=12, seed=5)[
            0
        ].parent.parent
    )
    b = _snapshot(
        synthesize_federation(tmp_path / "b", 2, patients_per_site=12, seed=5)[
            0
        ].parent.parent
    )
    c = _snapshot(
        synthesize_federation(tmp_path / "c", 2, patients_per_site=12, seed=6)[
            0
        ].parent.parent
    )
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert a[0] != c[0]
    assert {uid for _, uid, _ in a[1]}.isdisjoint({uid for _, uid, _ in c[1]})


def test_sites_differ_in_population_and_scanner(federation):
    ages = [
        np.nanmean(
            np.array(
                read_ehr(
                    SiteConfig.from_toml(t).ehr_path,
                    TaskConfig(),
                    SiteConfig.from_toml(t).ehr,
                )
                .column(SiteConfig.from_toml(t).ehr.feature_column("age"))
                .to_pylist(),
                dtype=float,
            )
        )
        for t in federation
    ]
    assert ages[1] - ages[2] > 3  # site-02 (mean 70) is older than site-03 (mean 52)

    def air_hu(toml: Path) -> float:
        values = []
        for path in _files(toml.parent):
            ds = pydicom.dcmread(path)
            if ds.Modality == "CT":
                values.append(np.median(apply_modality_lut(ds.pixel_array, ds)[:8, :8]))
        return float(np.mean(values))

    assert air_hu(federation[1]) - air_hu(federation[2]) > 30


def test_labels_are_visible_in_the_ehr(tmp_path):
    toml = synthesize_federation(tmp_path, 1, patients_per_site=200, seed=3)[0]
    t = pq.read_table(toml.parent / "ehr.parquet").to_pydict()
    pn = np.array(t["pneumonia"]) == 1
    crp = np.array([np.nan if v is None else v for v in t["crp"]], dtype=float)
    assert np.nanmedian(crp[pn]) > 1.5 * np.nanmedian(crp[~pn])
    cm = np.array(t["cardiomegaly"]) == 1
    bnp = np.array([np.nan if v is None else v for v in t["bnp"]], dtype=float)
    assert np.nanmedian(bnp[cm]) > 1.5 * np.nanmedian(bnp[~cm])


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "site-01").mkdir()
    (tmp_path / "site-01" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by"):
        synthesize_federation(tmp_path, 1, patients_per_site=10)
    assert (tmp_path / "site-01" / "precious.txt").is_file()


def test_rewrites_its_own_output(tmp_path):
    synthesize_federation(tmp_path, 1, patients_per_site=10, seed=0)
    (tmp_path / "site-01" / "dicom" / "stale.dcm").write_bytes(b"x")
    synthesize_federation(tmp_path, 1, patients_per_site=10, seed=0)
    assert not (tmp_path / "site-01" / "dicom" / "stale.dcm").exists()
