"""Unit conversions for EHR features: a site's unit → the run's unit, affine.

A conversion is ``run_value = site_value * scale + offset``. Unit names are
compared after normalising case, spaces and a few spellings (``°C`` → ``degc``),
UCUM's codes among them (``Cel``, ``10*9/L``: OMOP's unit concepts).
"""

from __future__ import annotations

#: (from, to) -> (scale, offset), for normalised unit names
_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("months", "years"): (1.0 / 12.0, 0.0),
    ("weeks", "years"): (7.0 / 365.25, 0.0),
    ("days", "years"): (1.0 / 365.25, 0.0),
    ("degf", "degc"): (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("k", "degc"): (1.0, -273.15),
    ("fraction", "%"): (100.0, 0.0),
    ("mg/dl", "mg/l"): (10.0, 0.0),
    ("ng/l", "pg/ml"): (1.0, 0.0),
    ("pmol/l", "pg/ml"): (8.457, 0.0),  # NT-proBNP, 1 pmol/L = 8.457 pg/mL
    ("10^3/ul", "10^9/l"): (1.0, 0.0),
    ("/nl", "10^9/l"): (1.0, 0.0),
    ("10^6/l", "10^9/l"): (1e-3, 0.0),
    ("/min", "bpm"): (1.0, 0.0),
}

_SPELLINGS = {
    "°c": "degc",
    "celsius": "degc",
    "c": "degc",
    "°f": "degf",
    "fahrenheit": "degf",
    "f": "degf",
    "kelvin": "k",
    "year": "years",
    "y": "years",
    "yr": "years",
    "month": "months",
    "mo": "months",
    "day": "days",
    "d": "days",
    "week": "weeks",
    "percent": "%",
    "pct": "%",
    "beats/min": "bpm",
    "1/min": "/min",
    "x10^9/l": "10^9/l",
    "10e9/l": "10^9/l",
    "g/l": "g/l",
    "k/ul": "10^3/ul",
    "x10^3/ul": "10^3/ul",
    # UCUM codes, as OMOP's unit concepts spell them (concept_code)
    "cel": "degc",
    "[degf]": "degf",
    "a": "years",
    "wk": "weeks",
    "{beats}/min": "bpm",
    "10*9/l": "10^9/l",
    "10*3/ul": "10^3/ul",
    "10*6/l": "10^6/l",
}


def normalise_unit(unit: str) -> str:
    """Canonical spelling of a unit name (lower case, no spaces)."""
    key = unit.strip().lower().replace(" ", "").replace("µ", "u").replace("μ", "u")
    return _SPELLINGS.get(key, key)


def conversion(site_unit: str, run_unit: str) -> tuple[float, float] | None:
    """``(scale, offset)`` from the site's unit to the run's, None if unknown."""
    src, dst = normalise_unit(site_unit), normalise_unit(run_unit)
    if src == dst:
        return 1.0, 0.0
    if (src, dst) in _CONVERSIONS:
        return _CONVERSIONS[(src, dst)]
    if (dst, src) in _CONVERSIONS:
        scale, offset = _CONVERSIONS[(dst, src)]
        return 1.0 / scale, -offset / scale
    return None


def known_units(run_unit: str) -> list[str]:
    """Site units that convert to ``run_unit``."""
    dst = normalise_unit(run_unit)
    found = {dst}
    for a, b in _CONVERSIONS:
        if b == dst:
            found.add(a)
        if a == dst:
            found.add(b)
    return sorted(found)
