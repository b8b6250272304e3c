"""Images already generated in GenEval's folder layout, so any generator's output can be scored:

    DIR/00000/metadata.jsonl      the entry (one JSON object: GenEval's N-th metadata line)
    DIR/00000/samples/0000.png    its images (0000.png, 0001.png, ...)
    DIR/00001/...
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from flowgrpo.prompts.loaders import PromptFileError, load_geneval


def load_geneval_images(root: str | Path) -> tuple[list[np.ndarray], list[dict]]:
    """uint8 [H, W, 3] images and, per image, its folder's entry; folders and samples in numeric order."""
    root = Path(root)
    if not root.is_dir():
        raise PromptFileError(f"image folder not found: {root}")
    images, entries = [], []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        rows = load_geneval(folder / "metadata.jsonl")
        if len(rows) != 1:
            raise PromptFileError(f"{folder / 'metadata.jsonl'}: expected one entry, found {len(rows)}")
        entry = rows[0]
        samples = [p for p in (folder / "samples").glob("*.png") if re.fullmatch(r"\d+\.png", p.name)]
        for path in sorted(samples, key=lambda p: int(p.stem)):
            images.append(np.array(Image.open(path).convert("RGB")))
            entries.append(entry)
    if not images:
        raise PromptFileError(f"{root}: no images in GenEval's layout (NNNNN/metadata.jsonl, NNNNN/samples/NNNN.png)")
    return images, entries
