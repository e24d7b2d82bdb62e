"""The study's plots (matplotlib, headless, small PNGs) from ``study.json``'s content.

- ``rounds.png``: AUROC per round for every arm, one row per cell (patients per
  site, site count, base), one column per question (strategy, privacy and secure
  aggregation, modality);
- ``privacy-P.png``, one per size P (patients per site): AUROC against ε, one line
  per base (FedAvg + DP, and FedAvg without DP at the right edge), the pooled and
  local-only models without DP of each base as horizontal lines; one panel per
  site count;
- ``sites.png``: per-site AUROC bars of local-only, FedAvg and pooled, per cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_DPI = 80
_PANELS = (
    ("strategy", ("reference", "strategy")),
    ("privacy and SecAgg+", ("privacy", "secure aggregation")),
    ("modality and fusion", ("modality",)),
)


def _mean(entry: Mapping[str, Any] | None) -> float:
    value = (entry or {}).get("mean")
    return math.nan if value is None else float(value)


def _sd(entry: Mapping[str, Any] | None) -> float:
    value = (entry or {}).get("sd")
    return 0.0 if value is None else float(value)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(arms: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels with an arm of their own (a federation without ablations has one)."""
    return [
        (title, groups)
        for title, groups in _PANELS
        if any(
            e.get("per_round") and e["group"] in groups and name not in _REFERENCES
            for name, e in arms.items()
        )
    ]


_REFERENCES = {
    "pooled": ("--", "black"),
    "local": ("--", "grey"),
    "fedavg": ("-.", "darkgoldenrod"),
}
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:cyan")


def _title(cells: Mapping[str, Any], key: str) -> str:
    cell = cells.get(key)
    if not cell:
        return key
    size = "own data" if cell["patients"] == 0 else f"{cell['patients']:,}/site"
    return f"{size}, {cell['sites']} sites, {cell['base']}"


def plot_rounds(
    summary: Mapping[str, Any], path: Path, cells: Mapping[str, Any] | None = None
) -> Path:
    """AUROC per round per arm (mean over sites and seeds), one row per cell.

    Pooled, local-only and FedAvg are drawn in every panel for reference.
    """
    cells = cells or {}
    plt = _pyplot()
    rows = [(n, _panels(arms)) for n, arms in summary.items()]
    columns = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(4 * columns, 3.4 * len(rows)),
        dpi=_DPI,
        squeeze=False,
    )
    for row, (n_sites, panels) in enumerate(rows):
        arms = summary[n_sites]
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(panels):
                ax.axis("off")
                continue
            title, groups = panels[col]
            colors = iter(_COLORS * 2)
            for name, entry in arms.items():
                curve = entry.get("per_round")
                reference = name in _REFERENCES
                if not curve or (entry["group"] not in groups and not reference):
                    continue
                style, color = _REFERENCES.get(name, ("-", None))
                color = color or next(colors)
                own = entry["group"] in groups and name != "fedavg"
                ax.plot(
                    range(len(curve)),
                    [_mean(p) for p in curve],
                    linestyle="-" if own and not reference else style,
                    color=color,
                    marker="." if own and not reference else None,
                    linewidth=1.2,
                    label=entry["label"],
                )
            ax.set_title(f"{_title(cells, n_sites)}: {title}", fontsize=9)
            ax.set_xlabel("round (pooled/local: after as many epochs)", fontsize=8)
            ax.set_ylabel("AUROC (mean over sites)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_BASE_COLORS = {"pretrained": "tab:blue", "random": "tab:red"}


def _dp_points(arms: Mapping[str, Any]) -> list[tuple[float, Mapping[str, Any]]]:
    return sorted(
        (
            (float(entry["target_epsilon"]), entry)
            for entry in arms.values()
            if entry.get("seeds")
            and entry.get("target_epsilon") is not None
            and not entry.get("secure_aggregation")
            and not entry.get("classical")  # the fusion model's line only
        ),
        key=lambda item: item[0],
    )


def plot_privacy(
    summary: Mapping[str, Any], cells: Mapping[str, Any], patients: int, path: Path
) -> Path | None:
    """AUROC against the per-site ε at one size, one line per base.

    One panel per site count; FedAvg without DP is drawn at the right edge, the
    pooled and local-only models (without DP) of each base as horizontal lines.
    None: no DP arm ran at this size.
    """
    panels: dict[int, list[str]] = {}
    for key, cell in cells.items():
        if cell["patients"] == patients and _dp_points(summary.get(key, {})):
            panels.setdefault(cell["sites"], []).append(key)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4), dpi=_DPI, squeeze=False
    )
    spare = iter(c for c in _COLORS if c not in _BASE_COLORS.values())
    for ax, (n_sites, keys) in zip(axes[0], sorted(panels.items()), strict=True):
        ticks: list[float] = []
        for key in keys:
            arms, base = summary[key], cells[key]["base"]
            points = _dp_points(arms)
            eps = [e for e, _ in points]
            no_dp = max(eps) * 2.5
            xs = [*eps, no_dp]
            ticks = sorted({*ticks, *xs})
            entries = [entry for _, entry in points] + [arms.get("fedavg", {})]
            color = _BASE_COLORS.get(base) or next(spare)
            seeds = cells[key].get("seeds") or []
            ax.errorbar(
                xs,
                [_mean(e.get("auroc")) for e in entries],
                yerr=[_sd(e.get("auroc")) for e in entries],
                marker="o",
                capsize=3,
                color=color,
                label=f"FedAvg, {base} base ({len(seeds)} seed"
                f"{'' if len(seeds) == 1 else 's'})",
            )
            for name, style in (("pooled", "--"), ("local", ":")):
                value = _mean(arms.get(name, {}).get("auroc"))
                if math.isfinite(value):
                    ax.axhline(
                        value,
                        linestyle=style,
                        color=color,
                        alpha=0.7,
                        label=f"{arms[name]['label']}, {base} base",
                    )
        top = max(ticks)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{e:g}" if e != top else "no DP" for e in ticks])
        ax.minorticks_off()
        size = "own data" if patients == 0 else f"{patients:,} patients per site"
        ax.set_title(f"{size}, {n_sites} sites", fontsize=9)
        ax.set_xlabel("ε per site (δ = 1e-5)")
        ax.set_ylabel("AUROC (mean over sites)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sites(
    summary: Mapping[str, Any], path: Path, cells: Mapping[str, Any] | None = None
) -> Path:
    """Per-site bars: local only, FedAvg, pooled (mean ± sd over seeds), per cell."""
    cells = cells or {}
    plt = _pyplot()
    counts = list(summary)
    fig, axes = plt.subplots(
        len(counts), 1, figsize=(8, 3.2 * len(counts)), dpi=_DPI, squeeze=False
    )
    bars = (("local", "grey"), ("fedavg", "tab:blue"), ("pooled", "black"))
    for row, n_sites in enumerate(counts):
        arms, ax = summary[n_sites], axes[row][0]
        present = [(k, c) for k, c in bars if arms.get(k, {}).get("seeds")]
        sites = sorted(arms[present[0][0]]["per_site"]) if present else []
        width = 0.8 / max(len(present), 1)
        for i, (name, color) in enumerate(present):
            per_site = arms[name]["per_site"]
            ax.bar(
                [j + i * width for j in range(len(sites))],
                [_mean(per_site.get(s)) for s in sites],
                width,
                yerr=[_sd(per_site.get(s)) for s in sites],
                color=color,
                alpha=0.85,
                capsize=2,
                label=arms[name]["label"],
            )
        ax.set_xticks([j + width * (len(present) - 1) / 2 for j in range(len(sites))])
        ax.set_xticklabels(sites, fontsize=7)
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("AUROC", fontsize=8)
        ax.set_title(_title(cells, n_sites), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_names(data: Mapping[str, Any]) -> list[str]:
    """The plots a study's data can have, in the report's order."""
    sizes = data["settings"].get("patients", [])
    return ["rounds", *(f"privacy-{p}" for p in sizes), "sites"]


def write_plots(data: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every plot into ``out_dir`` (its earlier plots removed); name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    summary = data["summary"]
    cells = data["settings"].get("cells", {})
    written: dict[str, Path | None] = {
        "rounds": plot_rounds(summary, out_dir / "rounds.png", cells)
    }
    for patients in data["settings"].get("patients", []):
        name = f"privacy-{patients}"
        written[name] = plot_privacy(summary, cells, patients, out_dir / f"{name}.png")
    written["sites"] = plot_sites(summary, out_dir / "sites.png", cells)
    return {k: v for k, v in written.items() if v is not None}
