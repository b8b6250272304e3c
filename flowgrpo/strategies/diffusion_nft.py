"""DiffusionNFT (Zheng et al., 2025): online RL as negative-aware fine-tuning on the forward process.

The optimality probability of a sample is r = clip(A, ±c) / c / 2 + 1/2, with A its group advantage. Two implicit
policies share the trained velocity v_θ and the old policy's v_old: v⁺ = β v_θ + (1 - β) v_old, which the positive
samples pull toward, and v⁻ = (1 + β) v_old - β v_θ, which the negative ones do. Each predicts the clean sample,
x̂0 = x_t - t v, and the loss per sample and level is

    (r ‖x̂0(v⁺) - x0‖² / w⁺ + (1 - r) ‖x̂0(v⁻) - x0‖² / w⁻) · c / β,

with w = mean |x̂0 - x0| of each prediction (at least 1e-5, no gradient), the reference's adaptive weighting.
The old policy samples and is the lagged copy of the trained weights (decay min((n - flat) · rate, cap) after
iteration n, the reference's decay_type 1 by default). Each sample trains at int(T · fraction) of the sampler's own
levels, a random subset of its own (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py and config/nft.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from flowgrpo.policies.ema import ramp_decay
from flowgrpo.strategies.base import Sampling, option
from flowgrpo.strategies.forward import CleanSamples, ForwardElements, ForwardStrategy, time_fraction_levels


@dataclass(frozen=True)
class DiffusionNFTOptions:
    beta: float = option(1.0, "β: how far the implicit policies move from the old one, v± = v_old ± β (v_θ - v_old) "
                              "(the reference: 1, 0.1 for OCR)")
    adv_clip_max: float = option(5.0, "c: advantages are clipped to [-c, c] and mapped to r = A / c / 2 + 1/2")
    time_fraction: float = option(0.99, "each sample trains at int(num_steps x fraction) of the sampler's levels")
    ode_solver: str = option("dpm2", "the rollouts' deterministic sampler: euler, or dpm2 = DPM-Solver++(2M) "
                                     "(the reference's)")
    lag_flat: int = option(0, "old policy: iterations it equals the trained weights (decay 0)")
    lag_rate: float = option(0.001, "old policy: decay growth per iteration after the flat ones")
    lag_cap: float = option(0.5, "old policy: the largest decay (the reference's decay_type 1: 0, 0.001, 0.5; "
                                 "type 2: 75, 0.0075, 0.999)")


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float,
             adv_clip_max: float) -> Tensor:
    """DiffusionNFT's loss per row [n] (float64) from the trained and old velocities at x_t = (1 - t) x0 + t ε."""
    dims = tuple(range(1, x0.ndim))
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()

    def term(v_implicit: Tensor) -> Tensor:
        err = (x_t - tb * v_implicit).double() - x0.double()
        weight = err.detach().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
        return (err ** 2 / weight).mean(dim=dims)

    positive = term(beta * v + (1 - beta) * v_old)
    negative = term((1 + beta) * v_old - beta * v)
    r = r.double()
    return (r * positive + (1 - r) * negative) / beta * adv_clip_max


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clip(A, ±c) / c / 2 + 1/2: 1 for the best samples, 0 for the worst, 1/2 for the group's mean."""
    return advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5


class NFTElements(ForwardElements):
    def loss(self, ro: CleanSamples, chunk, advantages: Tensor) -> tuple[Tensor, Tensor]:
        """The loss of the chunk's elements [n, 1] and the trained velocity (the KL's input)."""
        o = self.strategy.options
        v_old = self.lagged(ro, chunk)
        x_t, t, _, cond = self.inputs(ro, chunk)
        v = self.policy.velocity(x_t, t, cond, ro.guidance, grad=True)
        r = optimality(advantages.to(v.device), o.adv_clip_max)
        x0 = ro.x0[chunk.rows]
        return nft_loss(v, v_old, x_t, x0, t, r, o.beta, o.adv_clip_max).float()[:, None], v


class DiffusionNFT(ForwardStrategy):
    """DiffusionNFT: negative-aware fine-tuning on forward-noised clean samples of the old policy."""

    name = "diffusion_nft"
    Options = DiffusionNFTOptions
    samples_lagged = True

    @classmethod
    def check(cls, options: DiffusionNFTOptions, sampling: Sampling, run) -> None:
        super().check(options, sampling, run)
        if options.beta <= 0:
            raise ValueError(f"diffusion_nft.beta must be > 0, got {options.beta}")
        if options.adv_clip_max <= 0:
            raise ValueError(f"diffusion_nft.adv_clip_max must be > 0, got {options.adv_clip_max}")
        if int(sampling.num_steps * options.time_fraction) < 1 or options.time_fraction > 1:
            raise ValueError(f"diffusion_nft.time_fraction={options.time_fraction} must be in (0, 1] and leave at "
                             f"least one of num_steps={sampling.num_steps} levels")
        ramp_decay(options.lag_flat, options.lag_rate, options.lag_cap)  # its own checks

    def lag_schedule(self):
        o = self.options
        return ramp_decay(o.lag_flat, o.lag_rate, o.lag_cap)

    def level_indices(self, rng: np.random.Generator, num_steps: int) -> list[int]:
        return time_fraction_levels(rng, num_steps, self.options.time_fraction)

    def elements(self, ro: CleanSamples) -> NFTElements:
        return NFTElements(self, ro)
