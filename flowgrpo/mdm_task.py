"""The masked-diffusion image task of the trainer (Co-GRPO): roll out the model under schedules drawn from the
schedule policy, score the images, and give each trajectory one advantage that both parts train on.

Randomness is keyed by the global sample, so a run does not depend on the number of processes: sample i of
iteration t draws its schedule action noise keyed (seed, SCHEDULE, t, i) and its step-k token noise keyed
(seed, TOKENS, t, i, k). The steps whose model column trains (all, or ``train_steps`` of them) are an
iteration-wide choice from the plan's shared generator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.policies.mdm import MaskedDiffusionPolicy, MaskRollout
from flowgrpo.pref import image_advantages
from flowgrpo.samplers.noise import Stream, keyed_normal
from flowgrpo.samplers.unmasking import SCHEDULE_VARIABLES
from flowgrpo.update import UpdateBatch


class MDMTask:
    kind = "mdm"
    reward_weights = None

    def __init__(self, policy: MaskedDiffusionPolicy, cfg, reward_fn, judge):
        self.policy, self.cfg, self.reward_fn, self.judge = policy, cfg, reward_fn, judge

    def rollout(self, plan) -> MaskRollout:
        cfg, idx, rows = self.cfg, plan.indices, plan.local_rows()
        num_steps = self.policy.schedule.num_steps
        eps = keyed_normal([(cfg.seed, Stream.SCHEDULE, plan.iteration, int(i)) for i in idx],
                           (num_steps, len(SCHEDULE_VARIABLES)))
        keys = [(cfg.seed, Stream.TOKENS, plan.iteration, int(i)) for i in idx]
        ro = self.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx], eps, keys)
        ro.train_steps = self.train_steps(plan, num_steps)
        return ro

    def train_steps(self, plan, num_steps: int) -> Tensor:
        """The steps whose model column trains this iteration: all, or ``train_steps`` of them at random."""
        k = self.cfg.train_steps
        if not k or k >= num_steps:
            return torch.arange(num_steps)
        return torch.from_numpy(plan.rng(0).choice(num_steps, size=k, replace=False)).sort().values

    def score(self, ro: MaskRollout, plan) -> Tensor:
        return self.reward_fn(ro.images, ro.prompts, ro.metadata)

    def advantages(self, ro: MaskRollout, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return image_advantages(self.judge, ro.images, rewards, plan, trainer, self.cfg)

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

    # Co-GRPO carries nothing across iterations beyond the trained parameters (the schedule is one of them)
    def end_iteration(self) -> None:
        pass

    def report(self, out) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
