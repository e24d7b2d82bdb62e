"""Radiology report and question–answer text from findings, and findings from text.

One set of rules, used both ways: the synthetic hospitals write their reports and
question–answer pairs with :func:`write_report` and :func:`write_qa`, and the
evaluation of a generative model reads findings back out of its generated reports
with :func:`extract_findings`. A model that writes a report these rules read as the
patient's true findings agrees with the labels.

A report is a ``Findings:`` paragraph with one sentence per finding (a positive or a
negative phrase), then an ``Impression:`` line naming the positive findings::

    Findings: A small nodule is seen in the lung. No pleural effusion. Lungs are
    clear. Heart size is normal. Impression: nodule.

Every phrase is in :data:`PHRASES`; a sentence that matches none is ignored by the
extractor. Pure: no I/O, randomness from an explicit generator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

REPORT_FINDINGS = ("nodule", "effusion", "pneumonia", "cardiomegaly")
"""The findings the report rules know (the synthetic hospitals' labels)."""

PHRASES: dict[str, dict[bool, tuple[str, ...]]] = {
    "nodule": {
        True: ("A small nodule is seen in the lung.", "There is a pulmonary nodule."),
        False: ("No pulmonary nodule.", "No nodule is seen."),
    },
    "effusion": {
        True: ("There is a pleural effusion.", "Small pleural effusion at the base."),
        False: ("No pleural effusion.", "The costophrenic angles are clear."),
    },
    "pneumonia": {
        True: (
            "Patchy consolidation in keeping with pneumonia.",
            "There is consolidation at the base.",
        ),
        False: ("Lungs are clear.", "No focal consolidation."),
    },
    "cardiomegaly": {
        True: ("The heart is enlarged.", "There is cardiomegaly."),
        False: ("Heart size is normal.", "The heart is not enlarged."),
    },
}
"""finding -> {present: phrases, absent: phrases}; every phrase ends with a full stop."""

NO_FINDINGS = "no acute findings"
QUESTIONS: dict[str, str] = {
    "nodule": "Is there a lung nodule?",
    "effusion": "Is there a pleural effusion?",
    "pneumonia": "Is there pneumonia?",
    "cardiomegaly": "Is the heart enlarged?",
}
"""Closed (yes/no) questions, one per finding."""
OPEN_QUESTION = "Which findings are present?"
"""The open question; its answer lists the positive findings or says none."""
CLOSED_ANSWERS = ("yes", "no")

_SENTENCE = re.compile(r"[^.]*\.")


def _key(text: str) -> str:
    """Lower case, single spaces, no leading/trailing space: how phrases compare."""
    return " ".join(text.lower().split())


_PHRASE_TO_FINDING = {
    _key(phrase): (finding, present)
    for finding, by_state in PHRASES.items()
    for present, phrases in by_state.items()
    for phrase in phrases
}


def impression(findings: Mapping[str, int]) -> str:
    """The impression: the positive findings in :data:`REPORT_FINDINGS` order, or none."""
    positive = [f for f in REPORT_FINDINGS if findings.get(f, 0)]
    return ", ".join(positive) if positive else NO_FINDINGS


def write_report(findings: Mapping[str, int], rng: np.random.Generator) -> str:
    """A report for ``findings`` (name -> 0/1); phrase variants drawn from ``rng``."""
    sentences = []
    for finding in REPORT_FINDINGS:
        options = PHRASES[finding][bool(findings.get(finding, 0))]
        sentences.append(options[int(rng.integers(len(options)))])
    return f"Findings: {' '.join(sentences)} Impression: {impression(findings)}."


def write_qa(
    findings: Mapping[str, int], rng: np.random.Generator, open_share: float = 0.2
) -> tuple[str, str]:
    """One question and its answer for ``findings``.

    With probability ``open_share`` the open question (answer: the impression),
    else a closed question about one finding drawn uniformly (answer: yes / no).
    """
    if rng.random() < open_share:
        return OPEN_QUESTION, impression(findings)
    finding = REPORT_FINDINGS[int(rng.integers(len(REPORT_FINDINGS)))]
    return QUESTIONS[finding], "yes" if findings.get(finding, 0) else "no"


def extract_findings(report: str) -> dict[str, int | None]:
    """Findings a report states: 1 present, 0 absent, None where it says nothing.

    Reads the ``Findings:`` sentences by the phrase table. A finding stated both
    ways (a contradictory report) counts as unstated.
    """
    body = report.split("Impression:", 1)[0]
    body = body.split("Findings:", 1)[-1]
    said: dict[str, set[bool]] = {f: set() for f in REPORT_FINDINGS}
    for sentence in _SENTENCE.findall(body):
        match = _PHRASE_TO_FINDING.get(_key(sentence))
        if match is not None:
            said[match[0]].add(match[1])
    return {f: (int(next(iter(s))) if len(s) == 1 else None) for f, s in said.items()}


def label_agreement(
    reports: Sequence[str], labels: np.ndarray, label_names: Sequence[str]
) -> float:
    """Share of (report, finding) pairs where the report states the true label.

    Only findings that are both run labels and known to the rules count, and only
    where the site knows the label (NaN: unknown, left out); a finding the report
    does not state counts as a disagreement. NaN without any pair.
    """
    columns = [(j, name) for j, name in enumerate(label_names) if name in PHRASES]
    if not reports or not columns:
        return float("nan")
    agree = total = 0
    for report, row in zip(reports, labels, strict=True):
        stated = extract_findings(report)
        for j, name in columns:
            if np.isnan(row[j]):
                continue
            total += 1
            agree += stated[name] is not None and stated[name] == int(row[j] > 0.5)
    return agree / total if total else float("nan")


def vocabulary() -> list[str]:
    """Every word the rules write (for a small fixed tokenizer vocabulary)."""
    texts = [p for by_state in PHRASES.values() for ps in by_state.values() for p in ps]
    texts += list(QUESTIONS.values()) + [OPEN_QUESTION, NO_FINDINGS, "Findings:"]
    texts += ["Impression:", *REPORT_FINDINGS, *CLOSED_ANSWERS]
    words: list[str] = []
    for text in texts:
        for word in re.findall(r"[A-Za-z]+", text):
            if word not in words:
                words.append(word)
    return words
