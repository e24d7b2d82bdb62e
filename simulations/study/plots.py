"""The study's plots (matplotlib, headless, small PNGs) from ``study.json``'s content.

- ``rounds.png``: AUROC per round for every arm, one row per site count, one
  column per question (strategy, privacy and secure aggregation, modality);
- ``privacy.png``: AUROC against epsilon, with pooled, local-only and no-DP lines;
- ``sites.png``: per-site AUROC bars of local-only, FedAvg and pooled.
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


def plot_rounds(summary: Mapping[str, Any], path: Path) -> Path:
    """AUROC per round per arm (mean over sites and seeds).

    Pooled, local-only and FedAvg are drawn in every panel for reference.
    """
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
            ax.set_title(f"{n_sites} sites: {title}", fontsize=9)
            ax.set_xlabel("round (pooled/local: after as many epochs)", fontsize=8)
            ax.set_ylabel("AUROC (mean over sites)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_privacy(summary: Mapping[str, Any], path: Path) -> Path | None:
    """AUROC against the per-site epsilon; no DP drawn at the right edge."""
    series = {}
    for n_sites, arms in summary.items():
        points = sorted(
            (
                (float(entry["target_epsilon"]), entry)
                for entry in arms.values()
                if entry.get("seeds")
                and entry.get("target_epsilon") is not None
                and not entry.get("secure_aggregation")
            ),
            key=lambda item: item[0],
        )
        if points:
            series[n_sites] = points
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=_DPI)
    for n_sites, points in series.items():
        arms = summary[n_sites]
        eps = [e for e, _ in points]
        no_dp = max(eps) * 2.5
        xs = [*eps, no_dp]
        entries = [entry for _, entry in points] + [arms.get("fedavg", {})]
        line = ax.errorbar(
            xs,
            [_mean(e.get("auroc")) for e in entries],
            yerr=[_sd(e.get("auroc")) for e in entries],
            marker="o",
            capsize=3,
            label=f"FedAvg, {n_sites} sites",
        )
        color = line[0].get_color()
        for name, style in (("pooled", "--"), ("local", ":")):
            value = _mean(arms.get(name, {}).get("auroc"))
            if math.isfinite(value):
                ax.axhline(
                    value,
                    linestyle=style,
                    color=color,
                    alpha=0.7,
                    label=f"{arms[name]['label']}, {n_sites} sites",
                )
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{e:g}" for e in eps] + ["no DP"])
        ax.minorticks_off()
    ax.set_xlabel("ε per site (δ = 1e-5)")
    ax.set_ylabel("AUROC (mean over sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sites(summary: Mapping[str, Any], path: Path) -> Path:
    """Per-site bars: local only, FedAvg, pooled (mean ± sd over seeds)."""
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
        ax.set_title(f"{n_sites} sites", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(data: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write every plot into ``out_dir``; name -> path of those written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = data["summary"]
    written = {
        "rounds": plot_rounds(summary, out_dir / "rounds.png"),
        "privacy": plot_privacy(summary, out_dir / "privacy.png"),
        "sites": plot_sites(summary, out_dir / "sites.png"),
    }
    return {k: v for k, v in written.items() if v is not None}
