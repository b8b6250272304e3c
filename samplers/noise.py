"""Randomness keyed by what it is for, so a run does not depend on how many processes share it.

Every random draw of training is derived from integer keys — (seed, stream, iteration, global sample index, step)
— never from a stream that advances with the work a process happens to do. Sample 17 of iteration 3 then
starts from the same noise and takes the same SDE noise whether one process or eight make it, no two samples
share a draw unless asked to (a group's shared initial noise, an antithetic pair), and a resumed run needs no
generator state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Stream", "KeyedNoise", "key_seed", "keyed_generator", "keyed_normal", "keyed_rng"]


class Stream:
    """What a draw is for: the first key of every derived seed, so purposes never share draws."""

    PROMPTS = 1  # which prompts an iteration trains on
    PLAN = 2  # per-iteration choices shared by every process (branch steps, trained-step subsets, schedule offsets)
    INIT = 3  # initial latents
    SDE = 4  # SDE step noise
    TOKENS = 5  # token sampling of text policies and of masked diffusion models
    EVAL = 6  # evaluation noise
    SCHEDULE = 7  # the schedule policy's actions (Co-GRPO)
    FORWARD = 8  # forward-process training draws: each sample's noise levels t and noise ε (DiffusionNFT, AWM)


def key_seed(*keys: int) -> int:
    """A 63-bit seed that mixes all ``keys`` (NumPy's SeedSequence hashing: close keys give unrelated seeds)."""
    if any(isinstance(k, bool) or int(k) != k or k < 0 for k in keys):
        raise ValueError(f"keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]) >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded from ``keys``."""
    return torch.Generator().manual_seed(key_seed(*keys))


def keyed_rng(*keys: int) -> np.random.Generator:
    """A NumPy generator seeded from ``keys``."""
    return np.random.default_rng(key_seed(*keys))


def keyed_normal(keys: Sequence[Sequence[int]], shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard normal ``[len(keys), *shape]``: row i drawn on CPU from its own generator seeded by ``keys[i]``,
    so a row's values depend on its keys only (not on the batch it is drawn in, nor the device)."""
    rows = [torch.randn(tuple(shape), generator=keyed_generator(*k), dtype=dtype) for k in keys]
    return torch.stack(rows).to(device) if rows else torch.empty((0, *shape), dtype=dtype, device=device)


class KeyedNoise:
    """SDE noise of a batch whose rows carry their own keys: ``noise(step, shape, rows)`` gives row i the draw
    keyed ``(*keys[i], step)`` times ``signs[i]``. Antithetic pairs share a key and take opposite signs."""

    def __init__(self, keys: Sequence[Sequence[int]], signs: Tensor | None = None):
        self.keys = [tuple(int(v) for v in k) for k in keys]
        self.signs = torch.ones(len(self.keys)) if signs is None else signs.to(torch.float32)
        if self.signs.shape != (len(self.keys),):
            raise ValueError(f"signs must have shape ({len(self.keys)},), got {tuple(self.signs.shape)}")

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, step: int, shape: Sequence[int], rows: Tensor | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """Noise ``[B, *shape]`` for ``step``; rows outside the bool mask ``rows`` are zero (and cost nothing)."""
        out = torch.zeros((len(self.keys), *shape), dtype=dtype)
        picked = range(len(self.keys)) if rows is None else torch.nonzero(rows.cpu()).flatten().tolist()
        picked = list(picked)
        if picked:
            draws = keyed_normal([(*self.keys[i], step) for i in picked], shape, dtype=dtype)
            out[picked] = draws * self.signs[picked].to(dtype).view(-1, *([1] * len(shape)))
        return out.to(device)

    def select(self, rows: Sequence[int]) -> "KeyedNoise":
        return KeyedNoise([self.keys[i] for i in rows], self.signs[list(rows)])
