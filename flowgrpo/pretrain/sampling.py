"""Deterministic ODE sampling and the conditioning probe for the Shapes base model."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import SD3Transformer2DModel

from flowgrpo.policies.families import SD3Family
from flowgrpo.samplers.rollout import sample_trajectory


def sd3_velocity(transformer: SD3Transformer2DModel, x: torch.Tensor, sigma: torch.Tensor,
                 embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The SD3 transformer's velocity at noise level sigma[B], called as the training policy calls it."""
    return SD3Family().velocity(transformer, x, sigma, {"embeds": embeds, "pooled": pooled},
                                dtype=transformer.dtype, config=transformer.config)


def cfg_velocity(transformer, x, sigma, embeds, pooled, neg_embeds, neg_pooled, scale: float) -> torch.Tensor:
    """Classifier-free guidance: both branches in one batch, v = v_u + scale (v_c - v_u)."""
    if scale == 1.0:
        return sd3_velocity(transformer, x, sigma, embeds, pooled)
    b = x.shape[0]
    v = sd3_velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]),
                     torch.cat([embeds, neg_embeds.expand(b, -1, -1)]), torch.cat([pooled, neg_pooled.expand(b, -1)]))
    v_c, v_u = v[:b], v[b:]
    return v_u + scale * (v_c - v_u)


@torch.no_grad()
def ode_sample(transformer, embeds, pooled, neg_embeds, neg_pooled, *, sigmas: torch.Tensor, cfg: float,
               generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Euler ODE from noise to latents for a batch of prompt embeddings."""
    x = torch.randn((embeds.shape[0], *latent_shape), generator=generator)
    traj = sample_trajectory(lambda x, sigma: cfg_velocity(transformer, x, sigma, embeds, pooled, neg_embeds,
                                                           neg_pooled, cfg),
                             x, sigmas, sde_mask=torch.zeros(len(sigmas) - 1, dtype=torch.bool), generator=None)
    return traj.latents[:, -1]


@torch.no_grad()
def conditioning_probe(transformer, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                       *, t: float, seed: int = 0) -> dict[str, float]:
    """Flow-matching loss at noise level t with the right prompts vs the same prompts shuffled.

    A model that uses its prompt has a clearly lower loss with the right prompt.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    perm = torch.randperm(latents.shape[0], generator=g)
    sigma = torch.full((latents.shape[0],), t)
    x_t = (1 - t) * latents + t * noise
    target = noise - latents
    out = {}
    for name, (e, p) in {"right": (embeds, pooled), "shuffled": (embeds[perm], pooled[perm])}.items():
        out[name] = float((sd3_velocity(transformer, x_t, sigma, e, p) - target).pow(2).mean())
    out["gap"] = (out["shuffled"] - out["right"]) / out["shuffled"]
    return out


def summarize(passed: dict[str, list[bool]]) -> dict[str, float]:
    """Per-tag accuracy and overall = mean over tags (GenEval)."""
    acc = {tag: float(np.mean(v)) for tag, v in passed.items()}
    acc["overall"] = float(np.mean(list(acc.values())))
    return acc
