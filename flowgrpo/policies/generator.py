"""Image generation from any model the project loads (base pipeline, full checkpoint, or LoRA; flow matching or a
masked diffusion model with its schedule)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from flowgrpo.media import to_uint8
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.policies.mdm import MaskedDiffusionPolicy, is_mdm

FLOW_STEPS, FLOW_GUIDANCE = 20, 4.5  # flow models' defaults (a masked diffusion model's come from its schedule)


def load_policy_for_sampling(model: str, *, lora: str | None = None, batch: int = 16,
                             device: str | None = None) -> FlowPolicy | MaskedDiffusionPolicy:
    """A pipeline (with its LoRA) on ``device``: the GPU when there is one, unless told otherwise."""
    if is_mdm(model):
        if lora:
            raise ValueError(f"{model} is a masked diffusion model: it trains and saves full weights, no LoRA")
        policy = MaskedDiffusionPolicy.from_pretrained(model, micro_batch=batch)
    else:
        policy = FlowPolicy.from_pretrained(model, micro_batch=batch)
        if lora:
            policy.pipe.load_lora_weights(lora)
    return policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def sampling_settings(policy, steps: int | None, guidance: float | None) -> tuple[int | None, float | None]:
    """(steps, guidance) as given; for a flow model, its defaults where not given. A masked diffusion model keeps
    None (its own schedule; a value replaces it with the hand-set schedule of that length or CFG)."""
    if isinstance(policy, MaskedDiffusionPolicy):
        return steps, guidance
    return steps or FLOW_STEPS, FLOW_GUIDANCE if guidance is None else guidance


def load_generator(model: str, *, lora: str | None = None, steps: int | None = None, guidance: float | None = None,
                   batch: int = 16) -> Callable[[list[str], int, int], list[list[Image.Image]]]:
    """`generate(prompts, n, seed) -> n PIL images per prompt`, deterministic in its arguments (ODE sampling, or a
    masked diffusion model's schedule)."""
    policy = load_policy_for_sampling(model, lora=lora, batch=batch)
    steps, guidance = sampling_settings(policy, steps, guidance)

    def generate(prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        g = torch.Generator().manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        images = to_uint8(policy.generate(flat, num_steps=steps, guidance=guidance, generator=g))
        return [[Image.fromarray(images[i * n + j]) for j in range(n)] for i in range(len(prompts))]

    return generate
