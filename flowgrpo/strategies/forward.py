"""Forward-process strategies: the flow-matching objective on forward-noised copies of the policy's own clean
samples, weighted by their group advantages (DiffusionNFT, AWM). Sampling and training are decoupled: a rollout is
any deterministic sampler's output (Euler or DPM-Solver++(2M), any step count, CFG or none) and keeps only the
clean latents x0 and the prompts; there is no trajectory and no log-prob of a sampling step.

The update trains each sample at S noise levels t of its own, taken from the sampler's grid: x_t = (1 - t) x0 + t ε
with fresh ε. Both are keyed by (seed, iteration, sample, level), so a sample trains on the same x_t whatever the
number of processes; the update's elements are (sample, level) pairs, one level per forward pass.

Each strategy keeps a lagged copy of the trained weights, w_lag <- d(n) w_lag + (1 - d(n)) w after iteration n
(`flowgrpo.policies.ema.ramp_decay`): DiffusionNFT's old policy, which samples and anchors its implicit policies, and AWM's
EMA, its loss's proximal term. It is saved with the run's checkpoints. Its velocities are computed just before the
trained forward of the same chunk (the weights are swapped in and back between backward passes).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.policies.ema import WeightEMA, ramp_decay
from flowgrpo.policies.chunks import Chunk, UpdateBatch, grid_chunks
from flowgrpo.samplers.noise import Stream, keyed_normal, keyed_rng
from flowgrpo.strategies.base import Sampling, Strategy, initial_noise

ODE_SOLVERS = ("euler", "dpm2")


@dataclass
class CleanSamples:
    """A forward-process rollout: the clean samples of this process's rows and the levels each trains at."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: Tensor  # [b]
    x0: Tensor  # [b, ...] clean latents
    images: Tensor  # [b, 3, H, W] in [0, 1]
    times: Tensor  # [b, S] the noise levels t each row trains at
    noise_keys: list[tuple]  # per row: the key of its ε draws (one per level)
    guidance: float  # the CFG scale of sampling, which the training forwards use too

    def __len__(self) -> int:
        return len(self.prompts)

    def noised(self, rows: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """(x_t [n, ...], t [n]) of ``rows`` at their level ``col``, and the ε it was drawn with."""
        x0 = self.x0[rows]
        eps = keyed_normal([(*self.noise_keys[int(i)], col) for i in rows], x0.shape[1:], device=x0.device)
        t = self.times[rows, col].to(x0.device)
        tb = t.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - tb) * x0 + tb * eps, t, eps


def velocity_mse(v: Tensor, target: Tensor) -> Tensor:
    """Per-row mean squared error over every latent dimension, in float64 [n]."""
    return ((v.double() - target.double()) ** 2).mean(dim=tuple(range(1, v.ndim)))


class ForwardElements:
    """The update's elements of a forward-process batch: chunks of rows x one level, their trained velocity, the
    reference's (for the KL, ‖v - v_ref‖² per element) and the lagged copy's (cached per chunk)."""

    def __init__(self, strategy: "ForwardStrategy", samples: CleanSamples):
        self.strategy, self.policy, self.samples = strategy, strategy.policy, samples
        self._lagged: dict[tuple, Tensor] = {}

    def chunks(self, ro: CleanSamples, rows: slice, micro_batch: int) -> list[Chunk]:
        return grid_chunks(rows, micro_batch, [slice(k, k + 1) for k in range(ro.times.shape[1])])

    def inputs(self, ro: CleanSamples, chunk: Chunk):
        x_t, t, eps = ro.noised(chunk.rows, chunk.cols.start)
        return x_t, t, eps, self.policy.cond([ro.prompts[int(i)] for i in chunk.rows])

    def velocity(self, ro: CleanSamples, chunk: Chunk, *, grad: bool = True, transformer=None) -> Tensor:
        x_t, t, _, cond = self.inputs(ro, chunk)
        return self.policy.velocity(x_t, t, cond, ro.guidance, transformer=transformer, grad=grad)

    def lagged(self, ro: CleanSamples, chunk: Chunk) -> Tensor:
        """The lagged copy's velocity at the chunk's x_t (no gradient)."""
        if chunk.key not in self._lagged:
            with self.strategy.lagged_weights(), torch.no_grad():
                self._lagged[chunk.key] = self.velocity(ro, chunk, grad=False)
        return self._lagged[chunk.key]

    def reference_out(self, ro: CleanSamples, chunk: Chunk) -> Tensor:
        with self.policy.reference() as ref:
            return self.velocity(ro, chunk, grad=False, transformer=ref)

    def kl(self, v: Tensor, v_ref: Tensor) -> Tensor:
        """‖v - v_ref‖² per element [n, 1] (mean over the latent), the velocity-space KL of the references."""
        return velocity_mse(v, v_ref).float()[:, None]


class ForwardStrategy(Strategy):
    """Deterministic rollouts (with the lagged weights when ``samples_lagged``), kept as clean samples; the update
    trains the subclass's objective at the levels ``level_indices`` picks for each sample."""

    kind = "flow"
    samples_lagged = False  # whether rollouts use the lagged copy (DiffusionNFT's old policy) or the live weights

    @classmethod
    def check(cls, options, sampling: Sampling, run) -> None:
        if options.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"{cls.name}.ode_solver {options.ode_solver!r} is not one of {ODE_SOLVERS}")
        if run.kl_convention != "exact":
            raise ValueError(f"kl_convention {run.kl_convention} is a convention for SDE steps; {cls.name}'s KL is "
                             "the velocity's distance to the reference")
        if sampling.grpo_guard:
            raise ValueError(f"grpo_guard normalises the ratios of SDE steps; {cls.name} trains the forward process "
                             "and has no ratio")

    def __init__(self, policy, options, sampling: Sampling, scoring):
        super().__init__(policy, options, sampling, scoring)
        self.sigmas = policy.sigmas(sampling.num_steps)
        self.lag: WeightEMA | None = None  # made on first use: the trainer wraps or shards the weights first
        self.lag_updates = 0

    # ------------------------------------------------------------------ the lagged copy
    def lag_schedule(self):
        raise NotImplementedError

    def lagged_copy(self) -> WeightEMA:
        if self.lag is None:
            self.lag = WeightEMA(self.policy.trainable_module(), schedule=self.lag_schedule())
            self.lag.updates = self.lag_updates
        return self.lag

    def lagged_weights(self):
        return self.lagged_copy().applied(self.policy.trainable_module())

    # ------------------------------------------------------------------ rollout and update
    def level_indices(self, rng: np.random.Generator, num_steps: int) -> list[int]:
        """Indices into the sampler's grid (sigmas[0..T-1]) of the levels one sample trains at."""
        raise NotImplementedError

    def rollout(self, plan) -> CleanSamples:
        """Each row from its own initial noise (``shared_noise`` is ignored: a deterministic sampler would give a
        group as many copies of one image)."""
        s, idx, rows = self.sampling, plan.indices, plan.local_rows()
        steps = len(self.sigmas) - 1
        x_init = initial_noise(dataclasses.replace(s, shared_noise=False), plan, self.policy.latent_shape())
        with self.lagged_weights() if self.samples_lagged else contextlib.nullcontext():
            ro = self.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx], x_init, sigmas=self.sigmas,
                                     sde_mask=torch.zeros(steps, dtype=torch.bool), guidance=s.guidance,
                                     kind=s.sde_kind, noise_level=0.0, ode_solver=self.options.ode_solver)
        levels = [self.level_indices(keyed_rng(s.seed, Stream.FORWARD, plan.iteration, 0, int(i)), steps) for i in idx]
        times = self.sigmas[torch.tensor(levels, dtype=torch.long)].float()
        keys = [(s.seed, Stream.FORWARD, plan.iteration, 1, int(i)) for i in idx]
        return CleanSamples(ro.prompts, ro.metadata, ro.group_ids, ro.latents[:, -1].clone(), ro.images, times, keys,
                            s.guidance)

    def update_batch(self, ro: CleanSamples, adv: AdvantageResult) -> UpdateBatch:
        b, s = ro.times.shape
        return UpdateBatch(ro, torch.ones(b, s), adv.advantages, adv.valid, torch.zeros(b, s), max_len=s,
                           recompute_old=True, elements=self.elements(ro))

    def elements(self, ro: CleanSamples) -> ForwardElements:
        raise NotImplementedError

    def end_iteration(self) -> None:
        self.lagged_copy().update(self.policy.trainable_module())
        self.lag_updates = self.lag.updates

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"lag_updates": self.lag_updates}

    def load_state_dict(self, state: dict) -> None:
        self.lag_updates = int(state.get("lag_updates", 0))

    def tensors(self) -> dict[str, Tensor]:
        return {f"lagged.{n}": t for n, t in self.lagged_copy().full().items()}

    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        lagged = {n.removeprefix("lagged."): t for n, t in tensors.items()}
        expected = set(self.lagged_copy().shadow)
        if set(lagged) != expected:
            missing, extra = sorted(expected - set(lagged)), sorted(set(lagged) - expected)
            raise ValueError(f"{where}: its strategy tensors are not {self.name}'s lagged copy of the trainable "
                             f"parameters ({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. "
                             f"{extra[:2]})")
        self.lagged_copy().load(lagged, updates=self.lag_updates, where=where)


def time_fraction_levels(rng: np.random.Generator, num_steps: int, fraction: float) -> list[int]:
    """DiffusionNFT's levels: a random permutation of the sampler's steps, the first int(T x fraction)."""
    return rng.permutation(num_steps)[: int(num_steps * fraction)].tolist()


def stratified_levels(rng: np.random.Generator, sigmas: Tensor, count: int, time_range: float) -> list[int]:
    """AWM's levels (Flow-Factory's discrete sampling without the initial step): the grid's steps whose sigma is at
    least 1 - ``time_range``, after the first, split into ``count`` strata with one index drawn in each."""
    inside = torch.nonzero(sigmas[:-1] >= 1 - time_range - 1e-6).flatten()
    start, end = int(inside.min()) + 1, int(inside.max())
    bounds = torch.linspace(start, end, count + 1)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    u = torch.from_numpy(rng.random(count)).float()
    return (lower + (u * (upper - lower)).long()).tolist()
