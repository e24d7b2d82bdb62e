"""Free-text referral notes that mention findings partially and noisily.

Each finding is mentioned with a finding-specific probability when present and a
small one when absent; absent findings are sometimes negated ("no fever", "no
pleural effusion"). Sites write in one of three styles: terse abbreviations, full
sentences, or a template. Like real notes, they vary in length (a few to several
filler phrases), carry de-identification redactions ("XXXX" for names and dates)
and typos (a word in fifty has two letters swapped, dropped or doubled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np

FINDINGS = ("nodule", "effusion", "pneumonia", "cardiomegaly")

#: P(mentioned | finding present), P(mentioned | finding absent)
MENTION = {
    "nodule": (0.30, 0.05),
    "effusion": (0.65, 0.08),
    "pneumonia": (0.70, 0.08),
    "cardiomegaly": (0.40, 0.08),
}


class NoteStyle(StrEnum):
    """How a site's clinicians write."""

    TERSE = "terse"
    FULL = "full"
    TEMPLATE = "template"


_CUES: dict[NoteStyle, dict[str, tuple[str, ...]]] = {
    NoteStyle.TERSE: {
        "nodule": (
            "f/u lung nodule",
            "ex-smoker 40pk-yr",
            "?nodule on prior CT",
            "wt loss",
        ),
        "effusion": (
            "SOB",
            "dyspnoea",
            "reduced AE base",
            "dull to percussion",
            "pleuritic CP",
        ),
        "pneumonia": (
            "cough",
            "fever",
            "productive sputum",
            "r/o PNA",
            "crackles R base",
        ),
        "cardiomegaly": ("known CHF", "ankle oedema", "orthopnoea", "?cardiomegaly"),
    },
    NoteStyle.FULL: {
        "nodule": (
            "follow-up of a lung nodule seen on a previous scan",
            "long-standing heavy smoker",
            "unintentional weight loss over months",
        ),
        "effusion": (
            "increasing shortness of breath",
            "dullness to percussion at the base",
            "pleuritic chest pain",
            "reduced breath sounds at the base",
        ),
        "pneumonia": (
            "productive cough for three days",
            "febrile overnight",
            "please rule out pneumonia",
            "coarse crackles on auscultation",
        ),
        "cardiomegaly": (
            "known congestive heart failure",
            "bilateral ankle oedema",
            "sleeps on three pillows",
            "query enlarged heart",
        ),
    },
}
_CUES[NoteStyle.TEMPLATE] = _CUES[NoteStyle.FULL]

_NEGATIONS = {
    "nodule": ("no weight loss", "never smoker", "no nodule on prior imaging"),
    "effusion": ("no dyspnoea", "chest clear to percussion", "no pleural effusion"),
    "pneumonia": ("no fever", "denies cough", "afebrile", "no consolidation"),
    "cardiomegaly": ("no oedema", "no history of heart failure"),
}

#: Phrases with the de-identification tool's redactions in them.
_REDACTED = (
    "seen by Dr XXXX",
    "GP XXXX informed",
    "last admission XXXX",
    "discussed with XXXX",
    "XXXX ward",
)
TYPO_RATE = 0.02
"""Share of words with a typo."""

_FILLER = {
    NoteStyle.TERSE: (
        "obs stable",
        "bloods sent",
        "PMH HTN, T2DM",
        "NKDA",
        "CXR pls",
        "on ward 4",
        "non-specific chest pain",
        "fall last wk",
        "pre-op",
    ),
    NoteStyle.FULL: (
        "observations are stable",
        "bloods have been sent",
        "history of hypertension",
        "no known drug allergies",
        "admitted via the emergency department",
        "non-specific chest pain",
        "pre-operative assessment requested",
    ),
}
_FILLER[NoteStyle.TEMPLATE] = _FILLER[NoteStyle.FULL]


def site_cues(
    style: NoteStyle, drop_fraction: float, rng: np.random.Generator
) -> dict[str, tuple[str, ...]]:
    """A site's own dialect: the cue phrases of ``style`` its clinicians write.

    Each finding loses ``round(drop_fraction * n)`` of its ``n`` phrases (at least
    one phrase is always kept), drawn from ``rng``; so two sites with the same style
    still describe the same finding in partly different words.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    out = {}
    for name in FINDINGS:
        options = _CUES[style][name]
        keep = max(1, len(options) - round(drop_fraction * len(options)))
        picks = sorted(rng.choice(len(options), size=keep, replace=False))
        out[name] = tuple(options[i] for i in picks)
    return out


def write_note(
    findings: dict[str, int],
    age: int,
    sex: str | None,
    style: NoteStyle,
    rng: np.random.Generator,
    vocabulary: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """One note for a patient with latent ``findings`` (name -> 0/1).

    ``vocabulary`` (finding -> phrases) restricts the phrases to a site's dialect
    (:func:`site_cues`); by default every phrase of ``style`` is used.
    """
    phrases = vocabulary if vocabulary is not None else _CUES[style]
    cues: list[str] = []
    for name in FINDINGS:
        p_pos, p_neg = MENTION[name]
        if rng.random() < (p_pos if findings.get(name, 0) else p_neg):
            options = phrases[name]
            k = 1 + int(rng.random() < 0.4)
            picks = rng.choice(len(options), size=min(k, len(options)), replace=False)
            cues.extend(options[i] for i in sorted(picks))
        elif not findings.get(name, 0) and rng.random() < 0.12:
            cues.append(_NEGATIONS[name][int(rng.integers(len(_NEGATIONS[name])))])
    fillers = _FILLER[style] + _REDACTED
    extra = [
        fillers[i]
        for i in rng.choice(len(fillers), size=int(rng.integers(0, 6)), replace=False)
    ]
    order = rng.permutation(len(cues) + len(extra))
    parts = [typos((cues + extra)[i], rng) for i in order]
    who = {"F": "F", "M": "M"}.get(sex or "", "")
    if style is NoteStyle.TERSE:
        head = f"{age}{who}."
        body = ", ".join(parts) if parts else "routine"
        return f"{head} {body}."
    if style is NoteStyle.FULL:
        noun = {"F": "woman", "M": "man"}.get(sex or "", "patient")
        text = f"{age}-year-old {noun}."
        for part in parts:
            text += f" {part[0].upper()}{part[1:]}."
        return text
    reason = parts[0] if parts else "routine review"
    history = "; ".join(parts[1:]) if len(parts) > 1 else "nil of note"
    return (
        f"Indication: {reason}. History: {history}. Age {age}. Request: chest imaging."
    )


def typos(phrase: str, rng: np.random.Generator, rate: float = TYPO_RATE) -> str:
    """``phrase`` with a typo in about ``rate`` of its words (three letters or more).

    A typo swaps two letters, drops one or doubles one.
    """
    words = phrase.split(" ")
    for k, word in enumerate(words):
        if len(word) < 3 or rng.random() >= rate:
            continue
        i = int(rng.integers(0, len(word) - 1))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif kind == 1:
            word = word[:i] + word[i + 1 :]
        else:
            word = word[: i + 1] + word[i:]
        words[k] = word
    return " ".join(words)
