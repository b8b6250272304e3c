"""MixGRPO: SDE only inside a window of steps that slides along the schedule as training goes, ODE elsewhere.

The window (``sde_steps`` wide) starts at step 0 and moves ``window_stride`` steps later every
``window_shift_every`` iterations, within the first ``window_end`` steps (MixGRPO's timestep fraction, 60% of the
schedule by default), then starts again at 0 (MixGRPO's roll-back). Its position is a function of the iteration
count, which the training state holds, so a resumed run continues at the same position. Only the window's steps
train. MixGRPO-Flash: ``ode_solver: dpm2`` integrates the steps after the window with DPM-Solver++(2M), on
``ode_compress`` of the remaining schedule.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowgrpo.samplers.rollout import compressed_tail, mixgrpo_window
from flowgrpo.strategies.base import Strategy


class MixGRPO(Strategy):
    name = "mixgrpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.width = min(cfg.sde_steps or 1, self.usable)
        self.end = min(cfg.window_end or max(self.width, round(0.6 * cfg.num_steps)), self.usable)
        self.ode_solver = cfg.ode_solver

    def window_start(self, iteration: int) -> int:
        mask = mixgrpo_window(iteration, self.cfg.num_steps, self.width, self.cfg.window_shift_every, end=self.end,
                              stride=self.cfg.window_stride)
        return int(mask.nonzero()[0])

    def schedule(self, task, plan) -> Tensor:
        """The model's schedule, compressed after the window for MixGRPO-Flash."""
        sigmas = super().schedule(task, plan)
        after = self.window_start(plan.iteration) + self.width
        if self.cfg.ode_compress < 1 and after < len(sigmas) - 1:
            sigmas = compressed_tail(sigmas, after, self.cfg.ode_compress)
        return sigmas

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        start = self.window_start(plan.iteration)
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[start : start + self.width] = True
        return mask

    def metrics(self, plan) -> dict[str, float]:
        return {"window_start": float(self.window_start(plan.iteration))}
