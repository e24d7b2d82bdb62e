"""`wardround site check` / `site deid` and the modality-dropout transform."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
import torch
import typer
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from wardround.client.cli import site_app
from wardround.client.deid import PROFILE, uid_pseudonym
from wardround.ops.config_file import load_run_config
from wardround.sitedata.transforms import drop_modalities
from wardround.synthetic.hospitals import synthesize_federation

runner = CliRunner()
SALT = "a-long-test-salt-0123456789"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(site_app, name="site")
    return app


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed")
    synthesize_federation(out, 1, patients_per_site=24, seed=3)
    return out


def test_site_check_json_reports_and_exits_zero(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    (site / "dicom" / "README.txt").write_text("exported by PACS")
    result = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["can_train"] and report["blocking"] == []
    assert report["dicom"]["files"] == 25 and report["dicom"]["usable_files"] == 24
    assert report["dicom"]["not_usable"] == {"not DICOM (no DICOM header)": 1}
    assert sum(report["dicom"]["by_modality"].values()) == 24
    assert report["dicom"]["by_transfer_syntax"]["Explicit VR Little Endian"] == 24
    assert 0 < report["join"]["ehr_coverage"] <= 1 and report["join"]["items"] > 10
    assert set(report["ehr"]["label_prevalence"]) == {
        "nodule",
        "effusion",
        "pneumonia",
        "cardiomegaly",
    }
    assert len(report["fingerprint"]) == 64 and report["phi"]


def test_site_check_counts_duplicates_and_pydicom_warnings_and_logs_them(
    template, tmp_path
):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    before = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml"), "--json"]
    )
    first = sorted(p for p in (site / "dicom").rglob("*") if p.is_file())[0]
    (site / "dicom" / "resend").mkdir()
    shutil.copy(first, site / "dicom" / "resend" / "copy.dcm")  # a re-send
    shutil.copy(get_testdata_file("badVR.dcm"), site / "dicom" / "badVR.dcm")

    result = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml"), "--json"]
    )

    assert result.exit_code == 0, result.output
    report, earlier = json.loads(result.output), json.loads(before.output)
    assert report["dicom"]["duplicate_instances"] == 1
    assert report["join"]["items_with_image"] == earlier["join"]["items_with_image"]
    assert report["dicom"]["pydicom_warnings"] == {"Invalid value for VR IS: '…'.": 1}
    assert any("repeat the SOPInstanceUID" in w for w in report["warnings"])
    log = Path(report["log"])
    assert log == site / ".wardround-cache" / "site-check.log"
    assert "badVR.dcm: pydicom: Invalid value for VR IS" in log.read_text()
    assert "'1A'" not in log.read_text()  # the header value never reaches the log
    # the real entry point, as a terminal sees it: the report and nothing from pydicom
    (site / ".wardround-cache").rename(tmp_path / "old-cache")  # read every file again
    done = subprocess.run(
        [sys.executable, "-m", "wardround.cli", "site", "check", "--config",
         str(site / "site.toml")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "pydicom's warnings, file by file" in done.stdout


def test_site_check_keeps_its_cache_from_other_accounts(template, tmp_path):
    # under a login shell's umask the cache's files are world-readable: the folder
    # (decoded images, the DICOM index) is what keeps other accounts out
    import os
    import stat

    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    before = os.umask(0o022)
    try:
        result = runner.invoke(
            _app(), ["site", "check", "--config", str(site / "site.toml"), "--json"]
        )
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.output
    cache = site / ".wardround-cache"
    assert any(cache.rglob("*.parquet"))  # the index was written there
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_site_check_lists_blocking_problems(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    table = pq.read_table(site / "ehr.parquet").drop_columns(["bnp", "crp"])
    pq.write_table(table, site / "ehr.parquet")
    result = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml")]
    )
    assert result.exit_code == 3
    assert "BLOCKING" in result.output and "'bnp'" in result.output
    assert "'crp'" in result.output


def test_site_check_missing_config_is_a_config_error(tmp_path):
    result = runner.invoke(
        _app(), ["site", "check", "--config", str(tmp_path / "no.toml"), "--json"]
    )
    assert result.exit_code == 2
    assert json.loads(result.output)["blocking"][0].startswith("config file")


def test_site_check_broken_site_toml_exits_as_a_config_error(template, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    (site / "site.toml").write_text(
        (site / "site.toml").read_text() + "garbage = = 1\n"
    )
    result = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml")]
    )
    assert result.exit_code == 2
    assert "BLOCKING" in result.output and "not valid TOML" in result.output


def test_deid_profile_pseudonyms_and_ehr(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    (src / "junk.bin").write_bytes(b"\x00" * 64)
    originals = {p.name: pydicom.dcmread(p) for p in src.glob("*.dcm")}
    ehr = tmp_path / "ehr.parquet"
    import pyarrow as pa

    study = originals["CT_small.dcm"].StudyInstanceUID
    pq.write_table(
        pa.table({"study_uid": [study], "patient_id": ["X1"], "age": [3.0]}), ehr
    )
    out, ehr_out = tmp_path / "out", tmp_path / "ehr-deid.parquet"
    result = runner.invoke(
        _app(),
        [
            "site",
            "deid",
            "--in",
            str(src),
            "--out",
            str(out),
            "--salt",
            SALT,
            "--ehr",
            str(ehr),
            "--ehr-out",
            str(ehr_out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["files"] == 3 and summary["written"] == 2
    assert summary["duplicates"] == 0
    assert summary["failed"] == {"not DICOM (no DICOM header)": 1}
    written = [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
    by_sop = {}
    for ds in originals.values():
        by_sop[uid_pseudonym(ds.SOPInstanceUID, SALT.encode())] = ds
    for ds in written:
        orig = by_sop[ds.SOPInstanceUID]
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        for keyword in PROFILE:
            if keyword in orig and orig[keyword].value not in ("", None, []):
                assert keyword not in ds or ds[keyword].value != orig[keyword].value, (
                    keyword
                )
        for elem in ds.iterall():
            assert not elem.tag.is_private
        assert ds.StudyInstanceUID == uid_pseudonym(
            orig.StudyInstanceUID, SALT.encode()
        )
        assert ds.SOPClassUID == orig.SOPClassUID  # class UIDs are kept
        assert str(ds.StudyInstanceUID).startswith("2.25.")
    mapped = pq.read_table(ehr_out).to_pylist()[0]
    ct = next(d for d in written if d.Modality == "CT")
    assert mapped["study_uid"] == ct.StudyInstanceUID and mapped["age"] == 3.0
    assert mapped["patient_id"] != "X1"
    again = tmp_path / "again"
    runner.invoke(
        _app(), ["site", "deid", "--in", str(src), "--out", str(again), "--salt", SALT]
    )
    assert sorted(p.relative_to(again) for p in again.rglob("*.dcm")) == sorted(
        p.relative_to(out) for p in out.rglob("*.dcm")
    )  # reproducible


def test_deid_needs_a_salt(tmp_path):
    result = runner.invoke(
        _app(), ["site", "deid", "--in", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--salt" in result.output


def test_drop_modalities_is_seeded_and_never_empties_an_example():
    present = torch.ones(512, 3)
    present[:64, 0] = 0  # no image
    present[64:80] = 0  # nothing at all: left alone
    batch = {"present": present, "labels": torch.zeros(512, 4)}
    a = drop_modalities(batch, 0.6, torch.Generator().manual_seed(1))
    b = drop_modalities(batch, 0.6, torch.Generator().manual_seed(1))
    assert torch.equal(a["present"], b["present"]) and a["labels"] is batch["labels"]
    assert torch.equal(batch["present"], present)  # input not modified
    out = a["present"]
    assert (out <= present).all()  # only hides, never invents
    assert (out[:64, 0] == 0).all() and (out[64:80] == 0).all()
    has = present.sum(1) > 0
    assert (out[has].sum(1) >= 1).all()
    assert 0.3 < 1 - out[80:].mean().item() < 0.7
    assert torch.equal(
        drop_modalities(batch, 0.0, torch.Generator())["present"], present
    )
    with pytest.raises(ValueError):
        drop_modalities(batch, 1.0, torch.Generator())


def test_site_privacy_reports_the_ledger(tmp_path):
    from wardround.client.ledger import PrivacyLedger, ledger_file
    from wardround.common.privacy import Mechanism

    site_toml = tmp_path / "site.toml"
    site_toml.write_text("[privacy]\nbudget-epsilon = 30.0\n")
    empty = runner.invoke(_app(), ["site", "privacy", "--config", str(site_toml)])
    assert empty.exit_code == 0 and "nothing spent yet" in empty.output
    ledger = PrivacyLedger(ledger_file(tmp_path / "privacy-ledger"))
    for run in ("run-a", "run-b"):
        entry = ledger.reserve(
            run, 1, Mechanism(1.0, 0.1, 50), delta=1e-5, max_grad_norm=1.0,
            accountant="rdp", base_model="f" * 64,
        )  # fmt: skip
        ledger.commit(entry, 50, epsilon_run=0.0, epsilon_total=0.0)
    result = runner.invoke(
        _app(), ["site", "privacy", "--config", str(site_toml), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rounds"] == 2 and set(report["runs"]) == {"run-a", "run-b"}
    assert report["epsilon_total"] > report["runs"]["run-a"] > 0

    # A per-model ledger of an earlier version beside it still counts.
    legacy = PrivacyLedger(tmp_path / "privacy-ledger" / ("ab" * 8 + ".jsonl"))
    entry = legacy.reserve(
        "run-old", 1, Mechanism(1.0, 0.1, 50), delta=1e-5, max_grad_norm=1.0,
        accountant="rdp", base_model="a" * 64,
    )  # fmt: skip
    again = runner.invoke(
        _app(), ["site", "privacy", "--config", str(site_toml), "--json"]
    )
    with_legacy = json.loads(again.output)
    assert with_legacy["earlier_ledgers"] == [str(legacy.path)]
    assert with_legacy["epsilon_total"] > report["epsilon_total"]
    assert entry and "run-old" in with_legacy["runs"]


@pytest.mark.parametrize("kind", ["report", "vqa"])
def test_site_check_counts_the_text_a_generative_task_needs(template, tmp_path, kind):
    from wardround.client.site_check import check_site
    from wardround.common.config import TaskConfig

    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    task = TaskConfig(kind=kind)
    report = check_site(site / "site.toml", task, image_size=32)
    assert report["can_train"], report["blocking"]
    assert report["text"]["kind"] == kind
    assert "validation" not in report  # no AUROC is measured on a text task's split
    assert report["text"]["studies_with_target"] == report["join"]["items"] > 10

    target = "report" if kind == "report" else "answer"
    table = pq.read_table(site / "ehr.parquet").drop_columns([target])
    pq.write_table(table, site / "ehr.parquet")
    report = check_site(site / "site.toml", task, image_size=32)
    assert not report["can_train"]
    assert any(f"`[ehr] {target} = " in line for line in report["blocking"])


def test_site_check_reports_the_validation_split_training_uses(template, tmp_path):
    from wardround.client.site_check import check_site, format_report
    from wardround.common.config import TaskConfig
    from wardround.common.text import get_tokenizer
    from wardround.sitedata.dataset import load_site_data
    from wardround.sitedata.site_config import SiteConfig

    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    task = TaskConfig()
    report = check_site(site / "site.toml", task, image_size=32)
    validation = report["validation"]
    data = load_site_data(
        SiteConfig.from_toml(site / "site.toml"),
        task,
        image_size=32,
        max_note_tokens=16,
        tokenizer=get_tokenizer("byte"),
    )
    labels = data.validation.tensors["labels"]
    assert validation["items"] == len(data.validation) > 0
    assert validation["patients"] == len(set(data.validation.patients.tolist()))
    for k, name in enumerate(task.labels):
        positives = int(labels[:, k].sum())
        assert validation["labels"][name] == {
            "positive": positives,
            "negative": len(labels) - positives,
        }
    assert "labels (positive/negative): nodule: " in format_report(report)


def test_site_check_with_a_run_config_applies_the_sites_privacy_floor(
    template, tmp_path
):
    from wardround.client.site_check import check_site
    from wardround.common.config import RunConfig

    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    toml = site / "site.toml"
    text = toml.read_text()
    assert "required = false" in text and "max-epsilon = 10.0" in text
    toml.write_text(
        text.replace("required = false", "required = true").replace(
            "max-epsilon = 10.0", "max-epsilon = 5.0"
        )
    )
    task = RunConfig().task
    for run, says in (
        (RunConfig(), "allows at most 5 per run"),  # the default target is 8
        (
            RunConfig().with_overrides(privacy={"enabled": False}),
            "requires DP-SGD",
        ),
    ):
        report = check_site(toml, task, image_size=32, run=run)
        assert not report["can_train"]
        assert any(says in line for line in report["blocking"]), report["blocking"]
    within = RunConfig().with_overrides(privacy={"target_epsilon": 4.0})
    assert check_site(toml, task, image_size=32, run=within)["can_train"]
    assert check_site(toml, task, image_size=32)["can_train"]  # no run: no refusal


# -- site approve --------------------------------------------------------------------
@pytest.fixture
def approving_site(tmp_path) -> tuple[Path, Path]:
    """A site.toml (state in its folder) and a run.toml that sets a few settings."""
    site_toml = tmp_path / "site.toml"
    site_toml.write_text('[site]\nname = "st-marys"\n')
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        "[federation]\nrounds = 7\n[privacy]\ntarget-epsilon = 2.5\n"
        "[secure-aggregation]\nreconstruction-threshold = 0.8\n"
    )
    return site_toml, run_toml


def _launch_hash(run_toml: Path, tmp_path: Path) -> str:
    """The hash `wardround launch --print-hash` prints (its own FAB builder)."""
    from wardround.server.launcher import build_app

    return build_app(load_run_config(run_toml), tmp_path / "coordinator-apps").fab_hash


def _approved(site_toml: Path) -> dict:
    from wardround.client.approvals import AppApprovals

    return AppApprovals(site_toml.parent / ".wardround-site").load()


def test_site_approve_run_config_shows_the_settings_and_the_launch_hash(
    approving_site, tmp_path
):
    from wardround.ops.audit import read_audit

    site_toml, run_toml = approving_site
    expected = _launch_hash(run_toml, tmp_path)
    result = runner.invoke(
        _app(),
        ["site", "approve", "--run-config", str(run_toml), "--config", str(site_toml),
         "--yes", "--note", "pilot study"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"app hash {expected}" in result.output
    for shown in (
        "[privacy]", "  target-epsilon = 2.5", "[secure-aggregation]",
        "  enabled = true", "  reconstruction-threshold = 0.8", "[federation]",
        "  rounds = 7", "[model]", "  hidden-size = 64", "[task]", "  labels = [",
    ):  # fmt: skip
        assert shown in result.output
    assert "cannot show" not in result.output
    assert list(_approved(site_toml)) == [expected]
    audit = read_audit(site_toml.parent / ".wardround-site" / "audit.jsonl")
    assert audit[-1]["event"] == "app_approved"
    assert (audit[-1]["fab_hash"], audit[-1]["settings_shown"]) == (expected, True)

    listed = runner.invoke(_app(), ["site", "approvals", "--config", str(site_toml)])
    assert expected in listed.output and "pilot study" in listed.output


def test_site_approve_asks_before_approving(approving_site, tmp_path):
    site_toml, run_toml = approving_site
    args = [
        "site",
        "approve",
        "--run-config",
        str(run_toml),
        "--config",
        str(site_toml),
    ]
    declined = runner.invoke(_app(), args, input="n\n")
    assert declined.exit_code == 1
    assert "Approve this run at site st-marys?" in declined.output
    assert "not approved" in declined.output
    assert _approved(site_toml) == {}

    accepted = runner.invoke(_app(), args, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert list(_approved(site_toml)) == [_launch_hash(run_toml, tmp_path)]


def test_site_approve_a_bare_hash_warns_it_cannot_show_it(approving_site):
    site_toml, _ = approving_site
    result = runner.invoke(
        _app(), ["site", "approve", "ab" * 32, "--config", str(site_toml)]
    )
    assert result.exit_code == 0, result.output
    assert "cannot show what it approves" in result.output
    assert "--run-config run.toml" in result.output
    assert list(_approved(site_toml)) == ["ab" * 32]


def test_site_approve_refuses_a_hash_that_is_not_the_run_configs(approving_site):
    site_toml, run_toml = approving_site
    result = runner.invoke(
        _app(),
        ["site", "approve", "ab" * 32, "--run-config", str(run_toml),
         "--config", str(site_toml), "--yes"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"not the {'ab' * 32} given" in result.output
    nothing = runner.invoke(_app(), ["site", "approve", "--config", str(site_toml)])
    assert nothing.exit_code == 2 and "a run.toml or its hash" in nothing.output
    assert _approved(site_toml) == {}


def test_site_approve_revokes_by_run_config(approving_site, tmp_path):
    site_toml, run_toml = approving_site
    base = [
        "site",
        "approve",
        "--run-config",
        str(run_toml),
        "--config",
        str(site_toml),
    ]
    assert runner.invoke(_app(), [*base, "--yes"]).exit_code == 0
    revoked = runner.invoke(_app(), [*base, "--revoke"])
    assert revoked.exit_code == 0 and "approval withdrawn" in revoked.output
    assert _approved(site_toml) == {}


def test_site_approve_warns_a_site_without_imaging_of_a_run_that_requires_images(
    approving_site,
):
    site_toml, run_toml = approving_site  # its site.toml names no dicom-dirs
    args = ["site", "approve", "--run-config", str(run_toml), "--config"]

    needs = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    run_toml.write_text(run_toml.read_text() + "[task]\nrequire-image = false\n")
    fine = runner.invoke(_app(), [*args, str(site_toml), "--yes"])

    assert needs.exit_code == 0 and fine.exit_code == 0
    assert "has no imaging" in needs.output and "refuse to train" in needs.output
    assert "has no imaging" not in fine.output


def test_site_approve_warns_of_a_run_its_privacy_floor_will_refuse(approving_site):
    site_toml, run_toml = approving_site  # the run targets epsilon 2.5
    args = ["site", "approve", "--run-config", str(run_toml), "--config"]
    within = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    site_toml.write_text(
        site_toml.read_text() + "[privacy]\nrequired = true\nmax-epsilon = 2.0\n"
    )
    above = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    run_toml.write_text(
        run_toml.read_text().replace("[privacy]", "[privacy]\nenabled = false")
    )
    no_dp = runner.invoke(_app(), [*args, str(site_toml), "--yes"])

    assert within.exit_code == above.exit_code == no_dp.exit_code == 0
    assert "floor will refuse" not in within.output
    assert "allows at most 2 per run" in above.output
    assert "floor will refuse" in above.output
    assert "requires DP-SGD" in no_dp.output


def test_site_approve_states_the_answers_a_run_may_ask_and_warns_of_un_noised_spares(
    approving_site,
):
    site_toml, run_toml = approving_site  # 7 rounds, DP, SecAgg+
    args = ["site", "approve", "--run-config", str(run_toml), "--config"]
    plain = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    run_toml.write_text(
        run_toml.read_text().replace("rounds = 7", "rounds = 7\nrepeatable-rounds = 2")
    )
    spare = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    run_toml.write_text(
        run_toml.read_text()
        .replace("[privacy]", "[privacy]\nenabled = false")
        .replace("reconstruction-threshold = 0.8", "enabled = false")
    )
    spare_no_dp = runner.invoke(_app(), [*args, str(site_toml), "--yes"])

    assert plain.exit_code == spare.exit_code == spare_no_dp.exit_code == 0
    assert "at most 7 training and 8 evaluation message(s)\n" in plain.output
    assert (
        "at most 9 training and 10 evaluation message(s), 2 of each spare"
        in spare.output
    )
    assert "un-noised" not in spare.output
    assert "max-repeatable-rounds" not in spare.output  # the site allows 2
    assert "repeatable-rounds = 2 without DP" in spare_no_dp.output
    run_toml.write_text(
        run_toml.read_text().replace("repeatable-rounds = 2", "repeatable-rounds = 3")
    )
    beyond = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    assert "max-repeatable-rounds = 2: this site will refuse" in beyond.output


def test_site_approve_warns_that_a_set_batch_size_tells_the_cohort_size(
    approving_site,
):
    site_toml, run_toml = approving_site  # DP on
    args = ["site", "approve", "--run-config", str(run_toml), "--config"]
    recipe = runner.invoke(_app(), [*args, str(site_toml), "--yes"])
    run_toml.write_text(run_toml.read_text() + "\n[train]\nbatch-size = 1\n")
    one = runner.invoke(_app(), [*args, str(site_toml), "--yes"])

    assert recipe.exit_code == one.exit_code == 0
    assert "batch-size" in recipe.output and "warning: train.batch-size" not in (
        recipe.output
    )
    assert "warning: train.batch-size = 1: the sample rate" in one.output
    assert "  batch-size = 1" in one.output  # and [train] is shown


def test_site_check_json_gives_a_json_document_when_the_run_config_is_broken(
    tmp_path,
):
    """A script reading --json output gets an object with the error, and exit 2."""
    site_toml = tmp_path / "site.toml"
    site_toml.write_text('[site]\nname = "x"\n')
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("[federation\n")
    result = runner.invoke(
        _app(),
        ["site", "check", "--config", str(site_toml), "--run-config", str(run_toml),
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["error"]["kind"] == "configuration error"
    assert "is not valid TOML" in document["error"]["message"]
    assert document["error"]["exit_code"] == 2


def test_site_check_counts_undecodable_images_of_studies_that_train_apart(
    template, tmp_path
):
    """An image whose study has no EHR row would not train anyway: said apart."""
    import pydicom

    site = tmp_path / "site"
    shutil.copytree(template / "site-01", site)
    files = sorted((site / "dicom").rglob("*.dcm"))

    def unusable_slope(ds: pydicom.Dataset, path: Path) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "7.77", 0
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(b"7.77", b"abc "))

    for path in files[:2]:  # two studies that train
        unusable_slope(pydicom.dcmread(path), path)
    orphan = pydicom.dcmread(files[2])  # a study no EHR row names
    orphan.StudyInstanceUID = orphan.SeriesInstanceUID = "2.25.1234567"
    orphan.SOPInstanceUID = "2.25.7654321"
    unusable_slope(orphan, site / "dicom" / "orphan.dcm")

    result = runner.invoke(
        _app(), ["site", "check", "--config", str(site / "site.toml"), "--json"]
    )
    report = json.loads(result.stdout)
    assert sum(report["dicom"]["decode_failures"].values()) == 3
    assert report["dicom"]["decode_failures_of_trained_studies"] == 2
    assert any(
        w.startswith("2 study image(s) could not be decoded")
        for w in report["warnings"]
    )
    assert any(w.startswith("1 more study image(s)") for w in report["warnings"])


def test_site_approve_fits_each_setting_to_the_terminal_and_repeats_the_essentials(
    approving_site, monkeypatch
):
    """A long value cannot wrap into a line that reads like one of the screen's own."""
    import os

    site_toml, run_toml = approving_site  # DP on, SecAgg+ on
    monkeypatch.setattr(
        shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((80, 24))
    )
    padded = "x" + " " * 120 + "[privacy] enabled = false"
    run_toml.write_text(
        run_toml.read_text() + f'\n[task.categorical]\nsex = ["F", "M", "{padded}"]\n'
    )
    result = runner.invoke(
        _app(),
        ["site", "approve", "--run-config", str(run_toml), "--config", str(site_toml)],
        input="n\n",
    )
    lines = result.stdout.splitlines()
    long = [
        line for line in lines if len(line) > 79 and not line.startswith("app hash")
    ]
    assert long == []
    assert not any("enabled = false" in line for line in lines)
    summary = [line for line in lines if line.startswith("approving ")]
    assert summary and "DP-SGD on (ε 2.5, δ 1e-05)" in summary[0]
    assert "SecAgg+ on" in summary[0]
