"""Line plots for people to look at: labelled axes, a legend, and a standard-error band where a series has one
(matplotlib, drawn off screen to PNG)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

Series = tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float], Sequence[float]]


def line_plot(series: dict[str, Series], path: str | Path, *, title: str, xlabel: str, ylabel: str,
              size: tuple[float, float] = (7.2, 4.4)) -> Path:
    """One line with dots per name: (x values, y values) or (x values, y values, standard errors), the errors drawn
    as a band of ±1 SE around the line. Returns the path of the PNG."""
    if not any(len(s[0]) for s in series.values()):
        raise ValueError("line_plot needs at least one point")
    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        for name, (xs, ys, *se) in series.items():
            (line,) = ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
            if se:
                lo = [y - e for y, e in zip(ys, se[0])]
                hi = [y + e for y, e in zip(ys, se[0])]
                ax.fill_between(list(xs), lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
