"""Line plots for people to look at (PNG, drawn with Pillow: no plotting library needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str,
              xlabel: str, ylabel: str, size: tuple[int, int] = (720, 440)) -> Path:
    """One line (with dots) per name: (x values, y values); the axes span the data. Returns the path."""
    xs = [x for x_values, _ in series.values() for x in x_values]
    ys = [y for _, y_values in series.values() for y in y_values]
    if not xs:
        raise ValueError("line_plot needs at least one point")
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    for k in range(5):  # axis ticks and labels
        yv, xv = y0 + k / 4 * (y1 - y0), x0 + k / 4 * (x1 - x0)
        d.text((8, at(x0, yv)[1] - 6), f"{yv:.3g}", fill="black")
        d.text((at(xv, y0)[0] - 10, h - bottom + 6), f"{xv:.3g}", fill="black")
    d.text((left, 10), title, fill="black")
    d.text((w // 2 - 40, h - 20), xlabel, fill="black")
    d.text((8, top - 16), ylabel, fill="black")
    for k, (name, (x_values, y_values)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = [at(x, y) for x, y in zip(x_values, y_values)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((w - right - 190, top + 8 + 14 * k), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
