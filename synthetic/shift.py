"""Stated, deterministic differences between synthetic hospitals (non-IID settings).

The default generator already makes sites differ a little (three presets). A study
of how federated training copes with heterogeneous hospitals needs stronger
differences, and needs them *stated*: :class:`Heterogeneity` holds the knobs, a
study writes the values it used into its output, and they are fixed before the
study runs (never tuned to make a result look good).

Each knob draws per-site values from a generator seeded by ``(seed, site index)``
on a stream of its own, so turning one knob does not move what the others draw:

- **label skew**: every finding's prevalence log-odds at a site moves by
  ``N(0, label_skew)`` (a site with 40 % pneumonia next to one with 8 %);
- **scanner shift**: a site's intensity scale is multiplied by
  ``exp(N(0, scanner_shift))``, its offset moves by ``N(0, scanner_shift / 2)``,
  and its noise sd is drawn from ``scanner_noise``;
- **note dialect**: each site drops ``note_dialect`` of every finding's cue phrases
  (:func:`~.notes.site_cues`), on top of its note style.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .dicom import Scanner
from .notes import site_cues

if TYPE_CHECKING:
    from .hospitals import SiteProfile

_LABEL_STREAM, _SCANNER_STREAM, _NOTE_STREAM = 101, 102, 103
_PREVALENCE_RANGE = (0.03, 0.7)


@dataclass(frozen=True)
class Heterogeneity:
    """How strongly synthetic sites differ beyond the generator's presets."""

    label_skew: float = 0.0
    """sd of each site's shift of each finding's prevalence log-odds."""
    scanner_shift: float = 0.0
    """sd of the log of each site's intensity scale (the offset's sd is half)."""
    scanner_noise: tuple[float, float] | None = None
    """Each site's pixel-noise sd drawn uniformly in this range (None: preset's)."""
    note_dialect: float = 0.0
    """Fraction of every finding's cue phrases each site never writes."""

    def __post_init__(self) -> None:
        if self.label_skew < 0 or self.scanner_shift < 0:
            raise ValueError("label_skew and scanner_shift must be >= 0")
        if not 0.0 <= self.note_dialect < 1.0:
            raise ValueError("note_dialect must be in [0, 1)")
        if self.scanner_noise is not None and not (
            0.0 <= self.scanner_noise[0] <= self.scanner_noise[1]
        ):
            raise ValueError("scanner_noise must be a range (low, high), 0 <= low")

    def as_dict(self) -> dict[str, Any]:
        """The settings, for a study's output and docs."""
        return dataclasses.asdict(self)


STUDY_HETEROGENEITY = Heterogeneity(
    label_skew=1.0, scanner_shift=0.15, scanner_noise=(0.02, 0.08), note_dialect=0.5
)
"""The learning-quality study's fixed setting (chosen before it ever ran): strong
label skew (±1 sd moves a 25 % prevalence to 11–48 %), scanner scales of about
0.86–1.16 (±1 sd) with offsets of ±0.075 and noise sd 0.02–0.08, and half of
each finding's note phrases unused at each site."""


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def shift_prevalence(
    prevalence: dict[str, float], label_skew: float, rng: np.random.Generator
) -> dict[str, float]:
    """Move each prevalence's log-odds by ``N(0, label_skew)``; clip to 3–70 %."""
    out = {}
    for name, p in prevalence.items():
        logit = np.log(p / (1 - p)) + rng.normal(0.0, label_skew)
        out[name] = float(np.clip(1 / (1 + np.exp(-logit)), *_PREVALENCE_RANGE))
    return out


def shift_scanner(
    scanner: Scanner, heterogeneity: Heterogeneity, rng: np.random.Generator
) -> Scanner:
    """A site's scanner with the heterogeneity's scale, offset and noise applied."""
    shift = heterogeneity.scanner_shift
    noise = scanner.noise
    if heterogeneity.scanner_noise is not None:
        noise = float(rng.uniform(*heterogeneity.scanner_noise))
    return dataclasses.replace(
        scanner,
        scale=float(scanner.scale * np.exp(rng.normal(0.0, shift))),
        offset=float(scanner.offset + rng.normal(0.0, shift / 2)),
        noise=noise,
    )


def apply_heterogeneity(
    profile: SiteProfile, heterogeneity: Heterogeneity, seed: int
) -> SiteProfile:
    """``profile`` with this heterogeneity's per-site draws applied (deterministic)."""
    changes: dict[str, Any] = {}
    if heterogeneity.label_skew > 0:
        changes["prevalence"] = shift_prevalence(
            profile.prevalence,
            heterogeneity.label_skew,
            _rng(seed, profile.index, _LABEL_STREAM),
        )
    if heterogeneity.scanner_shift > 0 or heterogeneity.scanner_noise is not None:
        changes["scanner"] = shift_scanner(
            profile.scanner, heterogeneity, _rng(seed, profile.index, _SCANNER_STREAM)
        )
    if heterogeneity.note_dialect > 0:
        changes["note_vocabulary"] = site_cues(
            profile.note_style,
            heterogeneity.note_dialect,
            _rng(seed, profile.index, _NOTE_STREAM),
        )
    return dataclasses.replace(profile, **changes)
