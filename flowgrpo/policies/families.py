"""Per-architecture glue between a diffusers flow pipeline and the family-agnostic FlowPolicy.

A family knows how to turn prompts into conditioning tensors, how to call the transformer for a
velocity at noise level sigma, the latent layout, and the sigma grid its pipeline samples on.
Everything else (sampling, log-probs, CFG, training) is shared. Conditioning is a dict of tensors
with the batch on dim 0, so it can be indexed, concatenated and cached per prompt. Latents are kept
in the VAE's [B, C, h, w] layout; families whose transformer reads tokens (FLUX) pack and unpack
inside `velocity`, so the samplers and the stored trajectories never see the packing.
"""
from __future__ import annotations

import inspect
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from flowgrpo.samplers.schedules import flow_sigmas

Cond = dict[str, Tensor]


class Family(Protocol):
    name: str
    def encode(self, pipe, prompts: list[str]) -> Cond: ...
    # The unconditional CFG branch's conditioning (equal to `encode` except where the pipeline differs).
    def encode_negative(self, pipe, prompts: list[str]) -> Cond: ...
    # `forward` is the transformer or its data-parallel wrapper; dtype and config are the transformer's, read once
    # by the policy (reading `transformer.dtype` walks every submodule).
    def velocity(self, forward, x: Tensor, sigma: Tensor, cond: Cond, *, dtype: torch.dtype, config) -> Tensor: ...
    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]: ...
    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor: ...
    def sigmas(self, pipe, num_steps: int, height: int, width: int) -> Tensor: ...


def _vae_decode(pipe, latents: Tensor) -> Tensor:
    """Latents -> images in [0, 1] through the VAE with its scaling/shift factors."""
    cfg = pipe.vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _check_size(height: int, width: int, multiple: int, why: str) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} ({why}); got {height}x{width}")


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

    encode_negative = encode

    def velocity(self, forward, x: Tensor, sigma: Tensor, cond: Cond, *, dtype: torch.dtype, config) -> Tensor:
        return forward(hidden_states=x.to(dtype), encoder_hidden_states=cond["embeds"],
                       pooled_projections=cond["pooled"], timestep=sigma * 1000.0, return_dict=False)[0]

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, height // f, width // f)

    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        return _vae_decode(pipe, latents)

    def image_seq_len(self, pipe, height: int, width: int) -> int:
        p = pipe.transformer.config.patch_size
        return (height // pipe.vae_scale_factor // p) * (width // pipe.vae_scale_factor // p)

    def sigmas(self, pipe, num_steps: int, height: int, width: int) -> Tensor:
        seq = self.image_seq_len(pipe, height, width)
        return flow_sigmas(dict(pipe.scheduler.config), num_steps, image_seq_len=seq)


# ------------------------------------------------------------------------------------------- FLUX
def pack_latents(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: FLUX's 2x2 patch tokens, row-major (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack_latents` for a latent of height h and width w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int) -> Tensor:
    """RoPE positions (0, row, column) of the packed tokens of an h x w latent, [(h/2)(w/2), 3]."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily:
    """FluxPipeline (FLUX.1 dev / schnell): CLIP pooled + T5 tokens, packed 2x2 latent tokens, RoPE ids.

    `guidance_scale` feeds the guidance embedding of guidance-distilled models (FLUX.1-dev); it is not
    classifier-free guidance, which the policy's `guidance` adds on top (FluxPipeline's `true_cfg_scale`).
    """

    name = "flux"

    def __init__(self, guidance_scale: float = 3.5, max_sequence_length: int = 512):
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length

    def encode(self, pipe, prompts: list[str]) -> Cond:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=pipe.transformer.device,
                                               max_sequence_length=self.max_sequence_length)
        return {"embeds": embeds, "pooled": pooled}

    encode_negative = encode

    def velocity(self, forward, x: Tensor, sigma: Tensor, cond: Cond, *, dtype: torch.dtype, config) -> Tensor:
        b, _, h, w = x.shape
        device = x.device
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, dtype=torch.float32, device=device)
        # FLUX's transformer takes the timestep in [0, 1] (it scales by 1000 itself): sigma, not sigma*1000.
        out = forward(hidden_states=pack_latents(x.to(dtype)), timestep=sigma.to(dtype), guidance=guidance,
                          pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                          txt_ids=torch.zeros(cond["embeds"].shape[1], 3, dtype=dtype, device=device),
                          img_ids=latent_image_ids(h, w).to(device=device, dtype=dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        _check_size(height, width, 2 * f, f"FLUX: VAE factor {f} x 2x2 latent patches")
        return (pipe.transformer.config.in_channels // 4, height // f, width // f)

    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        return _vae_decode(pipe, latents)

    def sigmas(self, pipe, num_steps: int, height: int, width: int) -> Tensor:
        """FluxPipeline's grid: base sigmas linspace(1, 1/n, n), dynamically shifted by the token count."""
        f = 2 * pipe.vae_scale_factor
        return flow_sigmas(dict(pipe.scheduler.config), num_steps, image_seq_len=(height // f) * (width // f),
                           base_sigmas=np.linspace(1.0, 1 / num_steps, num_steps))


# ------------------------------------------------------------------------------------------- Sana
def dpm_flow_sigmas(scheduler_config: dict, num_steps: int) -> Tensor:
    """The sigmas DPMSolverMultistepScheduler(use_flow_sigmas=True).set_timesteps(n) produces (float32, ends at 0).

    Sana samples on this grid: shifted sigmas from 1 - 1/T down to 1/n of that, then 0. Sampling it with
    Euler steps equals first-order DPM-Solver++ (for flow matching both reduce to x + (s' - s) v).
    """
    n_train = scheduler_config.get("num_train_timesteps", 1000)
    shift = scheduler_config.get("flow_shift", 1.0)
    s = 1.0 - np.linspace(1, 1 / n_train, num_steps + 1)
    s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1]
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


class SanaFamily:
    """SanaPipeline: Gemma-2 text tokens with an attention mask, linear-attention DiT, DC-AE latents.

    `complex_human_instruction`: None uses SanaPipeline's default instruction prefix for prompts, [] none,
    or a list of lines. As in the pipeline, the unconditional branch never gets the prefix.
    """

    name = "sana"

    def __init__(self, max_sequence_length: int = 300, complex_human_instruction: list[str] | None = None,
                 clean_caption: bool = False):
        self.max_sequence_length = max_sequence_length
        self.complex_human_instruction = complex_human_instruction
        self.clean_caption = clean_caption

    def _encode(self, pipe, prompts: list[str], instruction: list[str]) -> Cond:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=pipe.transformer.device,
            clean_caption=self.clean_caption, max_sequence_length=self.max_sequence_length,
            complex_human_instruction=instruction)
        return {"embeds": embeds, "mask": mask}

    def encode(self, pipe, prompts: list[str]) -> Cond:
        instruction = self.complex_human_instruction
        if instruction is None:
            instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        return self._encode(pipe, prompts, instruction)

    def encode_negative(self, pipe, prompts: list[str]) -> Cond:
        return self._encode(pipe, prompts, [])

    def velocity(self, forward, x: Tensor, sigma: Tensor, cond: Cond, *, dtype: torch.dtype, config) -> Tensor:
        timestep = sigma * 1000.0 * config.timestep_scale
        return forward(x.to(dtype), encoder_hidden_states=cond["embeds"].to(dtype),
                       encoder_attention_mask=cond["mask"], timestep=timestep, return_dict=False)[0]

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        _check_size(height, width, f, f"Sana: DC-AE factor {f}")
        return (pipe.transformer.config.in_channels, height // f, width // f)

    def decode(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        return _vae_decode(pipe, latents)

    def sigmas(self, pipe, num_steps: int, height: int, width: int) -> Tensor:
        cfg = dict(pipe.scheduler.config)
        if cfg.get("_class_name") == "DPMSolverMultistepScheduler" and cfg.get("use_flow_sigmas"):
            return dpm_flow_sigmas(cfg, num_steps)
        return flow_sigmas(cfg, num_steps)


FAMILIES: dict[str, type] = {"StableDiffusion3Pipeline": SD3Family, "FluxPipeline": FluxFamily,
                             "SanaPipeline": SanaFamily}


def family_for(pipe, **options) -> Family:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"unsupported pipeline {name}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name](**options)
