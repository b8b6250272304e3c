"""DanceGRPO (Xue et al., 2025) as its code trains (XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py): its own SDE
step (constant sigma_t = eta, `dance_sde`, eta 0.3), every step stochastic, and each sample trained on its own random
subset of int(n · timestep_fraction) of its n SDE steps, never the schedule's last step (the reference keeps
``latents[:, :-1]`` and draws ``torch.randperm`` per sample). Its advantages divide by the group's unbiased std + 1e-8
(``advantage_options`` under the grpo estimator)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, option


@dataclass(frozen=True)
class DanceGRPOOptions:
    timestep_fraction: float = option(0.6, "each sample trains int(n x fraction) of its n SDE steps, the last step "
                                           "of the schedule excluded (scripts/finetune/finetune_flux_grpo.sh: 0.6)")


def dance_train_steps(candidates: Tensor, k: int, rng: np.random.Generator) -> Tensor:
    """A uniformly random subset of ``k`` of the step indices ``candidates`` [n], sorted ascending."""
    if not 1 <= k <= len(candidates):
        raise ValueError(f"k={k} must be in [1, {len(candidates)}]")
    return candidates[torch.from_numpy(rng.permutation(len(candidates))[:k])].sort().values


class DanceGRPO(FlowStrategy):
    """DanceGRPO: its constant-eta SDE, each sample trained on its own random subset of the SDE steps (never the
    last step)."""

    name = "dance_grpo"
    Options = DanceGRPOOptions
    # what `make_config` fills in where the preset, the YAML and the command line say nothing: the reference's step,
    # eta (finetune_flux_grpo.sh: --eta 0.3) and, under the grpo estimator, its std (group_rewards.std() + 1e-8)
    run_defaults = {"sde_kind": "dance_sde", "noise_level": 0.3}
    grpo_defaults = {"unbiased": True, "eps": 1e-8}

    @classmethod
    def check(cls, options: DanceGRPOOptions, sampling: Sampling, run: RunContext) -> None:
        if not 0 < options.timestep_fraction <= 1:
            raise ValueError(f"dance_grpo.timestep_fraction must be in (0, 1], got {options.timestep_fraction}")
        if sampling.num_steps < 2:
            raise ValueError("dance_grpo never trains the last step: it needs num_steps >= 2")

    def train_steps(self, sde_mask: Tensor, plan) -> Tensor:
        """[b, k] each local row's own steps: k = int(n · fraction) of its SDE steps before the last, drawn with
        the row's global index as key (the same whatever the number of processes)."""
        last = sde_mask.shape[1] - 1
        candidates = torch.nonzero(sde_mask[0, :last]).flatten()
        if not bool((sde_mask[:, :last] == sde_mask[:1, :last]).all()) or len(candidates) == 0:
            raise ValueError("dance_grpo needs the same SDE steps on every row, at least one before the last step")
        k = max(1, int(len(candidates) * self.options.timestep_fraction))
        return torch.stack([dance_train_steps(candidates, k, plan.rng(0, int(i))) for i in plan.indices])
