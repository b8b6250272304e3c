"""Co-GRPO, the strategy of masked diffusion image models: roll out the model under schedules drawn from the
schedule policy, score the images, and give each trajectory one advantage that both parts train on.

Randomness is keyed by the global sample, so a run does not depend on the number of processes: sample i of
iteration t draws its schedule action noise keyed (seed, SCHEDULE, t, i) and its step-k token noise keyed
(seed, TOKENS, t, i, k). The steps whose model column trains (all, or ``model_steps`` of them) are an
iteration-wide choice from the plan's shared generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.policies.mdm import MODES, MaskRollout
from flowgrpo.samplers.noise import Stream, keyed_normal
from flowgrpo.samplers.unmasking import SCHEDULE_VARIABLES
from flowgrpo.strategies.base import RunContext, Sampling, Strategy, option


@dataclass(frozen=True)
class CoGRPOOptions:
    mode: str = option("joint", "what trains: model (the MDM), schedule (its inference schedule: unmask ratio, "
                                "temperatures, CFG per step) or joint (both, on one advantage per trajectory)")
    model_steps: int = option(0, "steps whose model term trains per iteration (0 = all)")
    schedule_lr: float = option(1e-2, "learning rate of the schedule policy (the learning-rate schedule decays it "
                                      "with lr)")
    schedule_std: float = option(0.0, "the schedule policy's exploration std before squashing (0 = the model's own)")


class CoGRPO(Strategy):
    """Co-GRPO (masked diffusion models): the model and its inference schedule (unmask ratio, temperatures, CFG per
    step) trained on one advantage per trajectory."""

    name = "co_grpo"
    kind = "mdm"
    Options = CoGRPOOptions

    @classmethod
    def check(cls, options: CoGRPOOptions, sampling: Sampling, run: RunContext) -> None:
        if run.kl_convention != "exact":
            raise ValueError(f"kl_convention {run.kl_convention} is a convention for SDE steps; co_grpo's KL is "
                             "over token draws")
        if sampling.grpo_guard:
            raise ValueError("grpo_guard normalises the ratios of Gaussian SDE steps; co_grpo's steps are token draws")
        if options.mode not in MODES:
            raise ValueError(f"co_grpo.mode {options.mode!r} is not one of {MODES}")
        if options.schedule_lr <= 0 or options.schedule_std < 0:
            raise ValueError(f"co_grpo.schedule_lr must be > 0 and co_grpo.schedule_std >= 0, got "
                             f"{options.schedule_lr}, {options.schedule_std}")
        if not 0 <= options.model_steps <= sampling.num_steps:
            raise ValueError(f"co_grpo.model_steps={options.model_steps} must be in [0, num_steps="
                             f"{sampling.num_steps}]")

    def rollout(self, plan) -> MaskRollout:
        seed, idx, rows = self.sampling.seed, plan.indices, plan.local_rows()
        num_steps = self.policy.schedule.num_steps
        eps = keyed_normal([(seed, Stream.SCHEDULE, plan.iteration, int(i)) for i in idx],
                           (num_steps, len(SCHEDULE_VARIABLES)))
        keys = [(seed, Stream.TOKENS, plan.iteration, int(i)) for i in idx]
        ro = self.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx], eps, keys)
        ro.train_steps = self.model_steps(plan, num_steps)
        return ro

    def model_steps(self, plan, num_steps: int) -> Tensor:
        """The steps whose model column trains this iteration: all, or ``model_steps`` of them at random."""
        k = self.options.model_steps
        if not k or k >= num_steps:
            return torch.arange(num_steps)
        return torch.from_numpy(plan.rng(0).choice(num_steps, size=k, replace=False)).sort().values

    def update_batch(self, ro: MaskRollout, adv: AdvantageResult) -> UpdateBatch:
        """Mask [b, 2T]: the model columns of the trained steps that committed tokens (model, joint modes) and every
        schedule column (schedule, joint modes)."""
        mode, num_steps = self.policy.mode, ro.num_steps
        mask = torch.zeros(len(ro), num_steps, 2)
        if mode != "schedule":
            mask[:, ro.train_steps, 0] = (ro.counts[:, ro.train_steps] > 0).float()
        if mode != "model":
            mask[:, :, 1] = 1.0
        return UpdateBatch(ro, mask.flatten(1), adv.advantages, adv.valid, ro.sampled_log_probs(),
                           max_len=2 * num_steps)

    def metrics(self, ro: MaskRollout, rewards: Tensor, plan) -> dict[str, float]:
        """The schedule at its means (averaged over the steps where a variable acts) and its mean exploration std."""
        schedule = self.policy.schedule
        values, active = schedule.mean_schedule().cpu(), schedule.active().cpu()
        out = {f"schedule/{name}": float(values[active[:, j], j].mean()) for j, name in enumerate(SCHEDULE_VARIABLES)}
        return out | {"schedule/std": float(schedule.log_std.detach().exp().mean())}
