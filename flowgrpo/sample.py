"""Image generation from any model the project loads (base pipeline, full checkpoint, or LoRA)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.rewards.shapes import to_uint8


def load_policy_for_sampling(model: str, *, lora: str | None = None, batch: int = 16,
                             device: str | None = None) -> FlowPolicy:
    """A pipeline (with its LoRA) on ``device``: the GPU when there is one, unless told otherwise."""
    policy = FlowPolicy.from_pretrained(model, micro_batch=batch)
    if lora:
        policy.pipe.load_lora_weights(lora)
    return policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_generator(model: str, *, lora: str | None = None, steps: int = 20, guidance: float = 4.5,
                   batch: int = 16) -> Callable[[list[str], int, int], list[list[Image.Image]]]:
    """`generate(prompts, n, seed) -> n PIL images per prompt`, deterministic in its arguments (ODE sampling)."""
    policy = load_policy_for_sampling(model, lora=lora, batch=batch)

    def generate(prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        g = torch.Generator().manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        images = to_uint8(policy.generate(flat, num_steps=steps, guidance=guidance, generator=g))
        return [[Image.fromarray(images[i * n + j]) for j in range(n)] for i in range(len(prompts))]

    return generate
