"""Evaluation images: fixed noise per batch, and the batches split over the processes of a run.

Batch j's noise is the j-th draw of one generator seeded with ``seed`` (every process draws them all), and process r
makes the batches j with j % world_size == r: any number of processes makes the images one process makes. A sharded
model's forwards are collectives, so there a process without a batch of its own in a round repeats its last one.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm


def eval_batches(n_images: int, images_per_prompt: int, batch: int) -> list[slice]:
    """Consecutive batches of at most ``batch`` images holding whole entries (an entry's images stay together)."""
    size = max(images_per_prompt, batch // images_per_prompt * images_per_prompt)
    return [slice(s, min(s + size, n_images)) for s in range(0, n_images, size)]


@torch.no_grad()
def sharded_samples(policy, todo: list[dict], *, images_per_prompt: int, num_steps: int, guidance: float, seed: int,
               batch: int, progress: bool, dist=None) -> Iterator[tuple[slice, list[dict], torch.Tensor]]:
    """(rows, entries, images [n, 3, H, W] in [0, 1]) of this process's batches of ``todo`` (one entry per image):
    flow models sample by ODE, masked diffusion models under their schedule."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    g = torch.Generator().manual_seed(seed)
    batches = eval_batches(len(todo), images_per_prompt, batch)
    for j, rows in enumerate(tqdm(batches, desc="eval", disable=not progress or rank != 0, leave=False)):
        chunk = todo[rows]
        x = policy.eval_noise(len(chunk), g)
        if j % world == rank:
            yield rows, chunk, policy.generate([e["prompt"] for e in chunk], num_steps=num_steps, guidance=guidance,
                                               x_init=x)
        elif j == len(batches) - 1 and dist is not None and dist.sharded and j % world < rank:
            # the last round leaves this process without a batch: make one in step with the others, and drop it
            policy.generate([e["prompt"] for e in chunk], num_steps=num_steps, guidance=guidance, x_init=x)
