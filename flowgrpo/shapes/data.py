"""Batches of rendered Shapes images with their prompts, for pretraining and probes."""
from __future__ import annotations

import numpy as np
import torch

from flowgrpo.prompts.loaders import ordered_tags
from flowgrpo.shapes.render import render


def tag_balanced_indices(entries: list[dict], n: int, rng: np.random.Generator,
                         weights: dict[str, float] | None = None) -> np.ndarray:
    """n entry indices: a tag among those present (uniform, or in proportion to ``weights``, 1 for unlisted tags),
    then a uniform entry of that tag."""
    present = ordered_tags(entries)
    by_tag = [np.array([i for i, e in enumerate(entries) if e["tag"] == t]) for t in present]
    if weights:
        p = np.array([weights.get(t, 1.0) for t in present], dtype=float)
        tags = rng.choice(len(by_tag), size=n, p=p / p.sum())
    else:
        tags = rng.integers(len(by_tag), size=n)
    return np.array([by_tag[t][rng.integers(len(by_tag[t]))] for t in tags])


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1] (the VAE's pixel range)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def render_batch(entries: list[dict], idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    return images_to_tensor([render(entries[i], rng) for i in idx])
