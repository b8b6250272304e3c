"""Per-architecture glue between a diffusers flow pipeline and the family-agnostic FlowPolicy.

A family knows three things about its pipeline: how to turn prompts into conditioning tensors,
how to call the transformer for a velocity at noise level sigma, and the latent layout. Everything
else (sampling, log-probs, CFG, training) is shared. Conditioning is a dict of tensors with the
batch on dim 0, so it can be indexed, concatenated and cached per prompt.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

Cond = dict[str, Tensor]


class Family(Protocol):
    name: str
    # The family's pipeline call with its defaults (e.g. T5 length) baked in, for `flowgrpo sample`.
    def encode(self, pipe, prompts: list[str]) -> Cond: ...
    def velocity(self, transformer, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor: ...
    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]: ...
    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor: ...
    def image_seq_len(self, pipe, height: int, width: int) -> int: ...


def _vae_decode(pipe, latents: Tensor) -> Tensor:
    """Latents -> images in [0, 1] through the VAE with its scaling/shift factors."""
    cfg = pipe.vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class SD3Family:
    """StableDiffusion3Pipeline (SD3 / SD3.5): joint-attention transformer, CLIP x2 (+ optional T5)."""

    name = "sd3"

    def __init__(self, max_sequence_length: int = 256):
        self.max_sequence_length = max_sequence_length

    def encode(self, pipe, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=pipe.transformer.device,
        )
        return {"embeds": embeds, "pooled": pooled}

    def velocity(self, transformer, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return transformer(hidden_states=x.to(transformer.dtype), encoder_hidden_states=cond["embeds"],
                           pooled_projections=cond["pooled"], timestep=sigma * 1000.0, return_dict=False)[0]

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, height // f, width // f)

    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        return _vae_decode(pipe, latents)

    def image_seq_len(self, pipe, height: int, width: int) -> int:
        p = pipe.transformer.config.patch_size
        return (height // pipe.vae_scale_factor // p) * (width // pipe.vae_scale_factor // p)


FAMILIES: dict[str, type] = {"StableDiffusion3Pipeline": SD3Family}


def family_for(pipe, **options) -> Family:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"unsupported pipeline {name}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name](**options)
