"""Reports and questions written from findings, findings read back, the scores."""

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest

from wardround.client.vlm_metrics import (
    exact_match,
    report_label_agreement,
    text_overlap,
)
from wardround.common.report_text import (
    QUESTIONS,
    REPORT_FINDINGS,
    extract_findings,
    label_agreement,
    write_qa,
    write_report,
)


@pytest.mark.parametrize("bits", list(itertools.product([0, 1], repeat=4)))
def test_every_written_report_reads_back_as_its_findings(bits):
    findings = dict(zip(REPORT_FINDINGS, bits, strict=True))
    rng = np.random.default_rng(sum(bits))
    for _ in range(4):  # every phrase variant gets drawn
        assert extract_findings(write_report(findings, rng)) == findings


def test_unstated_and_contradicted_findings_are_unknown():
    stated = extract_findings(
        "Findings: No nodule is seen. There is a pulmonary nodule. Lungs  are CLEAR."
    )
    assert stated == {
        "nodule": None,
        "effusion": None,
        "pneumonia": 0,
        "cardiomegaly": None,
    }


def test_label_agreement_counts_unstated_findings_as_wrong():
    labels = np.array([[1, 0, 0, 1]], np.float32)
    right = write_report(
        dict(zip(REPORT_FINDINGS, [1, 0, 0, 1], strict=True)), np.random.default_rng(0)
    )
    assert label_agreement([right], labels, REPORT_FINDINGS) == 1.0
    assert (
        label_agreement(["Findings: No pulmonary nodule."], labels, REPORT_FINDINGS)
        == 0.0
    )
    assert (
        report_label_agreement(
            ["Findings: There is cardiomegaly."], labels, REPORT_FINDINGS
        )
        == 0.25
    )
    # labels the rules do not know are not scored
    assert np.isnan(label_agreement([right], labels[:, :1], ("fracture",)))


def test_questions_are_answered_from_the_findings():
    rng = np.random.default_rng(1)
    findings = {"nodule": 0, "effusion": 1, "pneumonia": 0, "cardiomegaly": 0}
    seen = {write_qa(findings, rng) for _ in range(200)}
    assert ("Is there a pleural effusion?", "yes") in seen
    assert ("Is there a lung nodule?", "no") in seen
    assert ("Which findings are present?", "effusion") in seen


def test_exact_match_scores_closed_questions_only_and_overlap_is_chrf():
    generated = ["Yes.", "no", "effusion, nodule"]
    references = ["yes", "yes", "nodule, effusion"]
    assert exact_match(generated, references) == 0.5
    assert np.isnan(exact_match(["x"], ["nodule"]))
    assert text_overlap(
        ["No pleural effusion."], ["No pleural effusion."]
    ) == pytest.approx(100.0)
    assert 0 < text_overlap(["No effusion."], ["No pleural effusion."]) < 100


def test_synthetic_sites_write_reports_and_answers_that_agree_with_their_labels(
    synthetic_sites,
):
    from wardround.sitedata.site_config import SiteConfig

    for site_toml in sorted(synthetic_sites.glob("*/site.toml")):
        site = SiteConfig.from_toml(site_toml)
        table = pq.read_table(site.ehr_path).to_pylist()
        assert table
        for row in table:
            truth = {f: int(row[site.ehr.label_column(f)]) for f in REPORT_FINDINGS}
            assert extract_findings(row[site.ehr.report]) == truth
            question, answer = row[site.ehr.question], row[site.ehr.answer]
            if answer in ("yes", "no"):
                finding = {q: f for f, q in QUESTIONS.items()}[question]
                assert answer == ("yes" if truth[finding] else "no")


def test_label_agreement_leaves_out_findings_the_site_does_not_know():
    known = dict(zip(REPORT_FINDINGS, [1, 0, 0, 1], strict=True))
    report = write_report(known, np.random.default_rng(0))
    labels = np.array([[1, np.nan, 1, 1]], np.float32)  # 3rd is wrong, 2nd unknown
    assert label_agreement([report], labels, REPORT_FINDINGS) == 2 / 3
    nothing = np.full((1, 4), np.nan, np.float32)
    assert np.isnan(label_agreement([report], nothing, REPORT_FINDINGS))
