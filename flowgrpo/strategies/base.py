"""The rollout strategy every flow strategy builds on, and the keyed draws of flow rollouts.

A strategy sees the whole iteration (`Plan`): its choices (the SDE window, a group's branch step, the subset of
steps trained) come from the iteration's shared generator, so every process makes the same ones whatever the number
of processes. Each returns masks over the GLOBAL batch; the task keeps its own rows. State a strategy carries across
iterations (a window position, a calibrated noise scale) goes into the training state through ``state_dict``.

Every random draw is keyed by the global sample (see `flowgrpo.samplers.noise`): sample i of iteration t starts from
noise keyed (seed, t, i), or (seed, t, group) when a group shares its initial noise, and its SDE step k draws noise
keyed (seed, t, i, k), so a process makes exactly the images a single process would make for the same samples.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.samplers.noise import KeyedNoise, Stream, keyed_normal
from flowgrpo.samplers.rollout import dance_train_steps


def initial_noise(cfg, plan, shape: tuple[int, ...], groups: Tensor | None = None) -> Tensor:
    """x_T of this process's rows [b, *shape]: keyed by group when the members share it, else by sample; or of the
    given ``groups`` [p] (one row each, the draw their members share)."""
    if groups is None:
        keys = plan.group_ids[plan.indices] if cfg.shared_noise else plan.indices
    else:
        keys = groups
    per = int(cfg.shared_noise or groups is not None)  # a group's draw is not sample 0's
    return keyed_normal([(cfg.seed, Stream.INIT, plan.iteration, per, int(k)) for k in keys], shape)


def sde_noise(cfg, plan) -> KeyedNoise:
    """Each row's SDE noise keyed by its sample; antithetic pairs (members 2j, 2j+1 of a group) share a key and
    take opposite signs."""
    idx = plan.indices
    if cfg.antithetic:
        keys, signs = idx // 2, 1.0 - 2.0 * (idx % 2).float()
    else:
        keys, signs = idx, None
    return KeyedNoise([(cfg.seed, Stream.SDE, plan.iteration, int(k)) for k in keys], signs)


class Strategy:
    name = ""

    def __init__(self, cfg):
        self.cfg = cfg
        # CPS's last step (to sigma 0) has no noise, so it always runs as ODE
        self.usable = cfg.num_steps - 1 if cfg.sde_kind == "cps" else cfg.num_steps

    ode_solver = "euler"  # the deterministic steps after the SDE window

    def rollout(self, task, plan):
        """This process's rollouts: every row sampled on its own, stochastic where ``sde_mask`` says."""
        cfg, idx = self.cfg, plan.indices
        rows = plan.local_rows()
        sigmas = self.schedule(task, plan)
        mask = self.sde_mask(plan, len(sigmas) - 1)
        ro = task.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx],
                                 initial_noise(cfg, plan, task.policy.latent_shape()), sigmas=sigmas,
                                 sde_mask=mask[idx] if mask.ndim == 2 else mask, guidance=cfg.guidance,
                                 kind=cfg.sde_kind, noise_level=self.noise_level(len(sigmas) - 1),
                                 noise=sde_noise(cfg, plan), noise_freqs=cfg.noise_freqs, ode_solver=self.ode_solver)
        ro.train_steps = self.train_steps(ro.sde_mask.expand(len(ro), len(sigmas) - 1), plan)
        return ro

    def schedule(self, task, plan) -> Tensor:
        """The iteration's sigmas (the task's: the model's grid, or a jittered one)."""
        return task.schedule(plan)

    def noise_level(self, num_steps: int) -> float | Tensor:
        """The SDE noise level: one for every step, or [T] per step."""
        return self.cfg.noise_level

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        """[T] (the same for every row) or [B, T] over the global batch: True where a step is stochastic."""
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[: min(self.cfg.sde_steps or self.cfg.num_steps, self.usable)] = True
        return mask

    def train_steps(self, sde_mask: Tensor, plan) -> Tensor:
        """[b, S] step indices each local row trains on: all its SDE steps (rows have the same count)."""
        counts = sde_mask.sum(dim=1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError(f"every row needs the same, nonzero number of SDE steps; got {sorted(set(counts.tolist()))}")
        return torch.nonzero(sde_mask)[:, 1].view(len(sde_mask), -1)

    def advantages(self, task, ro, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return task.estimate(ro, rewards, plan, trainer)

    def end_iteration(self) -> None:
        """Move the state the strategy carries on to the next iteration (none here)."""

    def metrics(self, plan) -> dict[str, float]:
        """What to log of the strategy this iteration."""
        return {}

    def report(self, out: Path) -> None:
        """Write what people should see of the strategy into the run directory (nothing here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FlowGRPO(Strategy):
    name = "flow_grpo"


class DanceGRPO(Strategy):
    """DanceGRPO trains on a random subset of the sampled SDE steps (its timestep fraction, 0.6 by default)."""

    name = "dance_grpo"

    def train_steps(self, sde_mask: Tensor, plan) -> Tensor:
        steps = super().train_steps(sde_mask, plan)
        k = self.cfg.train_steps or max(1, math.ceil(0.6 * steps.shape[1]))
        if k >= steps.shape[1]:
            return steps
        g = torch.Generator().manual_seed(int(plan.rng(0).integers(2**62)))
        return steps[:, dance_train_steps(steps.shape[1], k, g)]


