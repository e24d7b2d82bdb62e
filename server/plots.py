"""PNG plots of a run's rounds (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from .records import RoundRecord


def plot_rounds(records: list[RoundRecord], out_dir: Path) -> list[Path]:
    """Write ``auroc.png`` and ``loss.png`` (global and per site) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [r.round for r in records]
    sites = sorted({e.site for r in records for e in r.evaluate})
    written = []
    for name, glob, per_site, ylabel in (
        (
            "auroc",
            [r.global_auroc for r in records],
            lambda e: e.auroc_macro,
            "validation AUROC (macro)",
        ),
        (
            "loss",
            [r.global_loss for r in records],
            lambda e: e.loss,
            "validation loss (BCE)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(
            rounds,
            glob,
            marker="o",
            linewidth=2.5,
            color="black",
            label="global (weighted)",
        )
        for site in sites:
            points = [
                (r.round, per_site(e))
                for r in records
                for e in r.evaluate
                if e.site == site
            ]
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker=".",
                linewidth=1,
                alpha=0.8,
                label=site,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0: before training)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_privacy(records: list[RoundRecord], out_dir: Path) -> Path | None:
    """Write ``privacy.png``: epsilon spent by this run at each site, per round."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for record in records:
        for report in record.train:
            if report.privacy is not None:
                points.setdefault(report.site, []).append(
                    (
                        record.round,
                        report.privacy.epsilon_run,
                        report.privacy.epsilon_run_prv,
                    )
                )
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for site, series in sorted(points.items()):
        line = ax.plot(
            [r for r, _, _ in series],
            [e for _, e, _ in series],
            marker="o",
            label=f"{site} (RDP)",
        )[0]
        prv = [(r, e) for r, _, e in series if e >= 0]
        if prv:
            ax.plot(
                [r for r, _ in prv],
                [e for _, e in prv],
                linestyle="--",
                color=line.get_color(),
                alpha=0.7,
                label=f"{site} (PRV)",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent by this run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "privacy.png"
    fig.savefig(path)
    plt.close(fig)
    return path
