"""G²RPO singular stochastic sampling: each group shares its ODE path up to one branch step (uniform in the window),
where each member takes one SDE step; optional multi-granularity advantages (coarser ODE finishes, summed)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.strategies.base import Strategy, initial_noise, sde_noise


class G2RPO(Strategy):
    """One branch step per group: every member takes its single SDE step there, from the shared ODE path. A group
    is evaluated as one row up to and including its branch point (`FlowPolicy.rollout_branched`)."""

    name = "g2rpo"

    def branch_steps(self, plan) -> Tensor:
        """[n_groups] each group's branch step, uniform in the window."""
        window = min(self.cfg.sde_steps or max(self.cfg.num_steps // 2, 1), self.usable)
        return torch.from_numpy(plan.rng(1).integers(window, size=int(plan.group_ids.max()) + 1))

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        return torch.nn.functional.one_hot(self.branch_steps(plan)[plan.group_ids], num_steps).to(torch.bool)

    def rollout(self, task, plan):
        cfg, idx = self.cfg, plan.indices
        rows = plan.local_rows()
        group_ids = plan.group_ids[idx]
        groups = torch.unique_consecutive(group_ids)  # this process's groups (or parts of groups), in row order
        ro = task.policy.rollout_branched([r["prompt"] for r in rows], rows, group_ids,
                                          initial_noise(cfg, plan, task.policy.latent_shape(), groups),
                                          self.branch_steps(plan)[groups], sigmas=self.schedule(task, plan),
                                          guidance=cfg.guidance, kind=cfg.sde_kind, noise_level=cfg.noise_level,
                                          noise=sde_noise(cfg, plan), noise_freqs=cfg.noise_freqs)
        ro.train_steps = self.train_steps(ro.sde_mask, plan)
        return ro

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
