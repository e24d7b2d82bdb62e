"""Report and question–answer columns for the synthetic EHR tables.

Every EHR row gets a radiology report and one question with its answer, written
from the patient's true findings by :mod:`wardround.common.report_text` (whose
rules also read findings back out of generated reports), so a model that sees the
image and the record can learn them. Drawn from its own generator stream, so the
other columns are unchanged by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..common.report_text import REPORT_FINDINGS, write_qa, write_report

TEXT_COLUMNS = {"report": "report", "question": "question", "answer": "answer"}
"""site.toml key -> column, for sites with the default schema."""
RENAMED_TEXT_COLUMNS = {
    "report": "report_text",
    "question": "vqa_question",
    "answer": "vqa_answer",
}
"""site.toml key -> column, for sites with their own EHR schema."""


def text_stream(seed: int, site_index: int) -> np.random.Generator:
    """The generator the reports of one site are drawn from."""
    return np.random.default_rng([seed, site_index, 0x5E9047])


def add_text_columns(
    table: pa.Table,
    patient_column: str,
    patient_ids: Sequence[str],
    findings: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    columns: Mapping[str, str] = TEXT_COLUMNS,
) -> pa.Table:
    """``table`` with report, question and answer columns for its rows.

    ``findings`` holds one 0/1 array per finding over ``patient_ids`` (the
    generator's patient order); rows are matched to patients by id. Texts are
    drawn per patient in that order, so they do not depend on the row order.
    """
    reports, questions, answers = {}, {}, {}
    for i, pid in enumerate(patient_ids):
        z = {name: int(findings[name][i]) for name in REPORT_FINDINGS}
        reports[pid] = write_report(z, rng)
        questions[pid], answers[pid] = write_qa(z, rng)
    row_ids = table.column(patient_column).to_pylist()
    for key, texts in (
        ("report", reports),
        ("question", questions),
        ("answer", answers),
    ):
        table = table.append_column(
            columns[key], pa.array([texts[p] for p in row_ids], pa.string())
        )
    return table
