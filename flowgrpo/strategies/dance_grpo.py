"""DanceGRPO: Flow-GRPO's sampling, trained on a random subset of the sampled SDE steps (its timestep fraction,
0.6 by default), the same subset for every row of an iteration."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.rollout import check_int
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, option


@dataclass(frozen=True)
class DanceGRPOOptions:
    train_steps: int = option(0, "SDE steps trained per iteration (0 = 60% of them, DanceGRPO's timestep fraction)")


def dance_train_steps(num_steps: int, k: int, generator: torch.Generator) -> Tensor:
    """A uniformly random subset of ``k`` distinct step indices of ``num_steps`` to train on, sorted ascending."""
    check_int("num_steps", num_steps)
    check_int("k", k)
    if k > num_steps:
        raise ValueError(f"k={k} exceeds num_steps={num_steps}")
    return torch.randperm(num_steps, generator=generator)[:k].sort().values


class DanceGRPO(FlowStrategy):
    """DanceGRPO: Flow-GRPO's sampling, a random subset of the SDE steps trained (the same for every row)."""

    name = "dance_grpo"
    Options = DanceGRPOOptions

    @classmethod
    def check(cls, options: DanceGRPOOptions, sampling: Sampling, run: RunContext) -> None:
        if not 0 <= options.train_steps <= sampling.num_steps:
            raise ValueError(f"dance_grpo.train_steps={options.train_steps} must be in [0, num_steps="
                             f"{sampling.num_steps}]")

    def train_steps(self, sde_mask: Tensor, plan) -> Tensor:
        steps = super().train_steps(sde_mask, plan)
        k = self.options.train_steps or max(1, math.ceil(0.6 * steps.shape[1]))
        if k >= steps.shape[1]:
            return steps
        g = torch.Generator().manual_seed(int(plan.rng(0).integers(2**62)))
        return steps[:, dance_train_steps(steps.shape[1], k, g)]
