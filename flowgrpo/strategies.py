"""Rollout strategies of flow GRPO: which steps are stochastic, which are trained, and any advantages of their own.

A strategy sees the whole iteration (`Plan`): its choices — the SDE window, a group's branch step, the subset of
steps trained — come from the iteration's shared generator, so every process makes the same ones whatever the number
of processes. Each returns masks over the GLOBAL batch; the task keeps its own rows.

- `flow_grpo`: SDE on every step of the window (the first `sde_steps`, 0 = all), every SDE step trained.
- `dance_grpo`: the same sampling, a random subset of `train_steps` of the SDE steps trained (the same for every row).
- `g2rpo`: G²RPO singular stochastic sampling — each group shares its ODE path up to one branch step (uniform in the
  window), where each member takes one SDE step; optional multi-granularity advantages (coarser ODE finishes).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.samplers.rollout import dance_train_steps


class Strategy:
    name = ""

    def __init__(self, cfg):
        self.cfg = cfg
        # CPS's last step (to sigma 0) has no noise, so it always runs as ODE
        self.usable = cfg.num_steps - 1 if cfg.sde_kind == "cps" else cfg.num_steps

    def sde_mask(self, plan) -> Tensor:
        """[T] (the same for every row) or [B, T] over the global batch: True where a step is stochastic."""
        mask = torch.zeros(self.cfg.num_steps, dtype=torch.bool)
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


class G2RPO(Strategy):
    """One branch step per group: every member takes its single SDE step there, from the shared ODE path."""

    name = "g2rpo"

    def sde_mask(self, plan) -> Tensor:
        window = min(self.cfg.sde_steps or max(self.cfg.num_steps // 2, 1), self.usable)
        n_groups = int(plan.group_ids.max()) + 1
        branch = torch.from_numpy(plan.rng(1).integers(window, size=n_groups))[plan.group_ids]
        return torch.nn.functional.one_hot(branch, self.cfg.num_steps).to(torch.bool)

    def advantages(self, task, ro, rewards: Tensor, plan, trainer) -> AdvantageResult:
        """The sampled images' advantages plus (multi-granularity) those of the same branches finished on each
        coarser ODE schedule, summed; a row is valid only if it is valid at every granularity."""
        adv = task.estimate(ro, rewards, plan, trainer)
        total, valid, stats = adv.advantages.clone(), adv.valid.clone(), dict(adv.stats)
        for lam in range(2, self.cfg.granularities + 1):
            coarse = replace(ro, images=task.policy.finish_coarse(ro, lam, ro.guidance))
            r = task.score(coarse, plan)
            a = task.estimate(coarse, r, plan, trainer)
            total, valid = total + a.advantages, valid & a.valid
            stats[f"reward_granularity{lam}"] = float(plan.gather(r.double()).nanmean())
        return AdvantageResult(torch.where(valid, total, torch.zeros_like(total)), valid, stats)


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FlowGRPO, DanceGRPO, G2RPO)}
