"""Chest phantoms: a density map in [0, 1] with drawn findings.

A frontal chest-like picture at 128x128: air, a body ellipse, two dark lung fields,
a bright spine band and heart. Each finding has a characteristic pattern, drawn
large enough to survive a resize to 64x64:

- nodule: one or two small bright round blobs inside a lung field;
- effusion: a bright band with a meniscus at the bottom of one or both lungs;
- pneumonia: a diffuse patchy opacity in one region of one lung;
- cardiomegaly: a large central bright ellipse (the heart).

Which patterns are drawn is decided by the caller (a noisy view of the latent
findings); this module only paints. Randomness comes from the generator passed in.
"""

from __future__ import annotations

import numpy as np

SIZE = 128

AIR, TISSUE, LUNG, HEART, BONE, LESION = 0.0, 0.55, 0.14, 0.72, 0.82, 0.78


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def smooth_field(rng: np.random.Generator, coarse: int, size: int = SIZE) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise, bilinearly upsampled."""
    low = rng.random((coarse + 1, coarse + 1), dtype=np.float32)
    pos = np.linspace(0.0, coarse, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), coarse - 1)
    frac = pos - i0
    rows = low[i0] * (1 - frac)[:, None] + low[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def chest_phantom(
    rng: np.random.Generator,
    *,
    nodule: bool,
    effusion: bool,
    pneumonia: bool,
    cardiomegaly: bool,
    size: int = SIZE,
) -> np.ndarray:
    """Paint one chest phantom; return float32 density [size, size] in [0, 1]."""
    s = size / SIZE
    yy, xx = _grid(size)
    img = np.zeros((size, size), np.float32)
    cy, cx = 66 * s + rng.normal(0, 2) * s, 64 * s + rng.normal(0, 2) * s
    img[_ellipse(yy, xx, cy, cx, 58 * s, 52 * s)] = TISSUE

    lungs = []
    for side in (-1, 1):
        ly = cy - 6 * s + rng.normal(0, 1.5) * s
        lx = cx + side * 24 * s + rng.normal(0, 1.5) * s
        ry, rx = (34 + rng.normal(0, 2)) * s, (17 + rng.normal(0, 1.2)) * s
        mask = _ellipse(yy, xx, ly, lx, ry, rx)
        img[mask] = LUNG
        lungs.append((mask, ly, lx, ry, rx))
    lung_any = lungs[0][0] | lungs[1][0]
    ribs = 0.05 * np.clip(np.sin(yy / (4.5 * s) + rng.uniform(0, 6.28)), 0, None)
    img += ribs * lung_any

    spine = np.abs(xx - cx) <= 5 * s
    img[spine & _ellipse(yy, xx, cy, cx, 58 * s, 52 * s)] = BONE

    scale = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.12))
    if cardiomegaly:
        scale = float(rng.uniform(1.38, 1.6))
    heart = _ellipse(yy, xx, cy + 14 * s, cx + 4 * s, 15 * s * scale, 17 * s * scale)
    img[heart] = HEART

    if nodule:
        mask, ly, lx, ry, rx = lungs[int(rng.integers(2))]
        for _ in range(int(rng.integers(1, 3))):
            ny = ly + rng.uniform(-0.6, 0.3) * ry
            nx = lx + rng.uniform(-0.5, 0.5) * rx
            radius = rng.uniform(4.0, 6.0) * s
            d2 = (yy - ny) ** 2 + (xx - nx) ** 2
            blob = np.clip(1.2 - np.sqrt(d2) / radius, 0, 1)
            img = np.maximum(img, np.where(blob > 0, LUNG + (LESION - LUNG) * blob, 0))

    if effusion:
        sides = [0, 1] if rng.random() < 0.35 else [int(rng.integers(2))]
        for i in sides:
            mask, ly, lx, ry, rx = lungs[i]
            height = rng.uniform(0.35, 0.55) * ry
            surface = ly + ry - height + 0.25 * height * ((xx - lx) / rx) ** 2
            band = mask & (yy >= surface)
            img[band] = LESION - 0.05

    if pneumonia:
        mask, ly, lx, ry, rx = lungs[int(rng.integers(2))]
        upper = rng.random() < 0.5
        region = mask & ((yy < ly) if upper else (yy >= ly - 4 * s))
        patches = smooth_field(rng, 7, size)
        patchy = np.clip((patches - 0.35) * 2.2, 0, 1) * region
        img += 0.42 * patchy

    return np.clip(img, 0.0, 1.0)
