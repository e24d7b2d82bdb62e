"""Scores of generated text against references (pure; numbers only leave the site).

- **exact match** for closed questions (answers ``yes`` / ``no``): the normalised
  generated answer equals the normalised reference (lower case, no punctuation,
  single spaces);
- **text overlap**: sacreBLEU's corpus chrF (character n-gram F-score, 0–100),
  robust to the word-order and inflection changes reports have;
- **label agreement**: findings read from each generated report by the rules that
  wrote the synthetic reports (:mod:`wardround.common.report_text`), compared with
  the study's labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..common.report_text import CLOSED_ANSWERS, label_agreement
from ..common.vlm_prompts import normalize_answer


def is_closed(reference: str) -> bool:
    """A closed question's reference answer is one of :data:`CLOSED_ANSWERS`."""
    return normalize_answer(reference) in CLOSED_ANSWERS


def exact_match(generated: Sequence[str], references: Sequence[str]) -> float:
    """Share of closed-question answers matched exactly (NaN: no closed question)."""
    pairs = [(g, r) for g, r in zip(generated, references, strict=True) if is_closed(r)]
    if not pairs:
        return math.nan
    return sum(normalize_answer(g) == normalize_answer(r) for g, r in pairs) / len(
        pairs
    )


def text_overlap(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0–100) of the generated texts against one reference each."""
    if not generated:
        return math.nan
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(generated), [list(references)]).score)


def report_label_agreement(
    generated: Sequence[str], labels: np.ndarray, label_names: Sequence[str]
) -> float:
    """Label agreement of generated reports (see module docstring; NaN: none)."""
    return label_agreement(list(generated), labels, label_names)
