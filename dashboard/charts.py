"""Charts rendered on the server by matplotlib (SVG): no script, nothing downloaded.

Each function takes plain series and returns SVG text; the pages embed them as
images. Colours are the Okabe-Ito palette (distinguishable with colour-blindness),
drawn on white with dark text for contrast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)


def _figure(width_in: float = 6.4, height_in: float = 3.0):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def _svg(figure) -> str:  # noqa: ANN001
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def line_chart(
    series: Mapping[str, Sequence[tuple[int, float | None]]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "round",
    ylim: tuple[float, float] | None = None,
    emphasised: str = "global",
) -> str:
    """One line per name (``emphasised``, the mean, thick and black) over rounds."""
    figure, axes = _figure()
    colours = iter(PALETTE)
    plotted = 0
    for name, points in series.items():
        kept = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if not kept:
            continue
        xs, ys = zip(*kept, strict=True)
        if name == emphasised:
            axes.plot(xs, ys, color="#000000", linewidth=2.4, marker="o", label=name)
        else:
            axes.plot(xs, ys, color=next(colours, "#444444"), marker=".", label=name)
        plotted += 1
    axes.set_title(title, loc="left", fontsize=11)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.xaxis.get_major_locator().set_params(integer=True)
    if plotted:
        axes.legend(fontsize=8, frameon=False, loc="best")
    else:
        axes.text(0.5, 0.5, "no rounds yet", ha="center", transform=axes.transAxes)
    return _svg(figure)


def bar_chart(
    groups: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    reference: tuple[str, float] | None = None,
) -> str:
    """Grouped bars (one group per round, one bar per name), with a reference line."""
    figure, axes = _figure()
    names = list(series)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        offsets = [g + (i - (len(names) - 1) / 2) * width for g in groups]
        axes.bar(
            offsets,
            series[name],
            width=width,
            color=PALETTE[i % len(PALETTE)],
            label=name,
        )
    if reference is not None:
        label, value = reference
        axes.axhline(value, color="#000000", linestyle="--", linewidth=1.2, label=label)
    axes.set_title(title, loc="left", fontsize=11)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.set_xticks(list(groups))
    if names or reference:
        axes.legend(fontsize=8, frameon=False, loc="best")
    if not groups:
        axes.text(0.5, 0.5, "no rounds yet", ha="center", transform=axes.transAxes)
    return _svg(figure)
