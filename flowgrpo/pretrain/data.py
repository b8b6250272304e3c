"""Batches of rendered Shapes images with their prompts, for pretraining and probes."""
from __future__ import annotations

import numpy as np
import torch

from flowgrpo.shapes.render import render


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1] (the VAE's pixel range)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def render_batch(entries: list[dict], idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    return images_to_tensor([render(entries[i], rng) for i in idx])
