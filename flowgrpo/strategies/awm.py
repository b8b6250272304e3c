"""AWM, Advantage Weighted Matching (Xue et al., 2025): the flow-matching loss on the policy's own clean samples,
weighted by their advantages, as a policy gradient with the matching loss for a log-likelihood.

The log-likelihood of a sample at level t is the negative matching loss -‖v_θ(x_t) - (ε - x0)‖² (mean over the
latent), reweighted by t (``weighting``: uniform, t, t2, huber, or the generalised Huber ghuber of power p:
-((mse + 1e-10)^p - 1e-10^p) · t / p). It enters the run's PPO-clip loss against its value before the update (the
ratio is 1 on each chunk's first pass), so with one pass the gradient is A · ∇ of the weighted matching loss. Two
regularisers: the run's KL to the reference (beta, ‖v_θ - v_ref‖²) and a proximal term ema_kl · ‖v_θ - v_ema‖² to
an EMA of the weights whose decay grows linearly to ``ema_cap`` over ``ema_warmup`` iterations. Each sample trains
at ``train_levels`` levels drawn stratified from the sampler's grid after its first step, within sigma >= 1 -
``time_range`` (X-GenGroup/Flow-Factory, src/flow_factory/trainers/awm.py and examples/awm/lora/sd3_5/default.yaml;
that reference draws one set of levels per micro-batch, here each sample draws its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowgrpo.policies.ema import ramp_decay
from flowgrpo.strategies.base import Sampling, option
from flowgrpo.strategies.forward import (CleanSamples, ForwardElements, ForwardStrategy, stratified_levels,
                                         velocity_mse)

WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")


@dataclass(frozen=True)
class AWMOptions:
    train_levels: int = option(6, "levels each sample trains at (the reference: 6 of 14 steps)")
    time_range: float = option(0.9, "levels are drawn among the grid's sigmas >= 1 - time_range")
    weighting: str = option("ghuber", f"the matching log-likelihood's weighting: {', '.join(WEIGHTINGS)}")
    ghuber_power: float = option(0.25, "p of the generalised Huber weighting")
    ema_kl: float = option(1.0, "weight of the proximal term ‖v_θ - v_ema‖² (0 = none)")
    ema_cap: float = option(0.3, "the EMA's decay after its warm-up")
    ema_warmup: int = option(1000, "iterations over which the EMA's decay grows linearly from 0 to ema_cap")
    ode_solver: str = option("euler", "the rollouts' deterministic sampler: euler, or dpm2 = DPM-Solver++(2M)")


def matching_log_prob(v: Tensor, target: Tensor, t: Tensor, weighting: str, power: float = 0.25) -> Tensor:
    """AWM's log-likelihood per row [n] (float64): the negative matching loss, weighted by the level t."""
    mse = velocity_mse(v, target)
    t = t.double()
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t2":
        return -mse * t ** 2
    if weighting == "huber":
        return -(torch.sqrt(mse + 1e-10) - 1e-5) * t
    if weighting == "ghuber":
        eps = torch.tensor(1e-10, dtype=torch.float64)
        return -((mse + eps) ** power - eps ** power) * t / power
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


class AWMElements(ForwardElements):
    def log_prob(self, ro: CleanSamples, chunk) -> tuple[Tensor, Tensor]:
        """The weighted matching log-likelihood of the chunk's elements [n, 1] (with gradient), and the velocity."""
        o = self.strategy.options
        if o.ema_kl:  # the EMA's weights are swapped in and out before the trained forward, never during its graph
            self.lagged(ro, chunk)
        x_t, t, eps, cond = self.inputs(ro, chunk)
        v = self.policy.velocity(x_t, t, cond, ro.guidance, grad=True)
        target = eps - ro.x0[chunk.rows]
        return matching_log_prob(v, target, t, o.weighting, o.ghuber_power).float()[:, None], v

    def penalty(self, ro: CleanSamples, chunk, v: Tensor) -> Tensor:
        """ema_kl · ‖v_θ - v_ema‖² per element [n, 1]."""
        ema_kl = self.strategy.options.ema_kl
        if not ema_kl:
            return v.new_zeros(len(v), 1)
        return ema_kl * velocity_mse(v, self.lagged(ro, chunk)).float()[:, None]


class AWM(ForwardStrategy):
    """AWM: advantage-weighted flow matching on forward-noised clean samples of the live policy."""

    name = "awm"
    Options = AWMOptions

    @classmethod
    def check(cls, options: AWMOptions, sampling: Sampling, run) -> None:
        super().check(options, sampling, run)
        if options.weighting not in WEIGHTINGS:
            raise ValueError(f"awm.weighting {options.weighting!r} is not one of {WEIGHTINGS}")
        if not 0 < options.time_range <= 1:
            raise ValueError(f"awm.time_range must be in (0, 1], got {options.time_range}")
        if options.train_levels < 1:
            raise ValueError(f"awm.train_levels must be >= 1, got {options.train_levels}")
        if sampling.num_steps < 3:
            raise ValueError(f"awm draws its levels after the grid's first step: num_steps={sampling.num_steps} "
                             "must be >= 3")
        if options.ema_kl < 0 or options.ema_warmup < 1 or options.ghuber_power <= 0:
            raise ValueError("awm.ema_kl must be >= 0, awm.ema_warmup >= 1 and awm.ghuber_power > 0")
        ramp_decay(1, options.ema_cap / options.ema_warmup, options.ema_cap)  # its own checks

    def lag_schedule(self):
        """The reference's linear warm-up: the n-th update (from 1) decays by ema_cap · (n - 1) / ema_warmup."""
        o = self.options
        return ramp_decay(1, o.ema_cap / o.ema_warmup, o.ema_cap)

    def level_indices(self, rng: np.random.Generator, num_steps: int) -> list[int]:
        o = self.options
        return stratified_levels(rng, self.sigmas, o.train_levels, o.time_range)

    def elements(self, ro: CleanSamples) -> AWMElements:
        return AWMElements(self, ro)
