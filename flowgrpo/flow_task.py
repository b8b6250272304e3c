"""The flow-matching image task of the trainer: roll out (through the rollout strategy), score and form advantages
for a diffusers flow policy."""
from __future__ import annotations

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.media import to_pixels
from flowgrpo.policies.flow import FlowPolicy, Rollout
from flowgrpo.pref import group_winrates, image_advantages
from flowgrpo.samplers.schedules import offset_schedule
from flowgrpo.strategies import Strategy
from flowgrpo.update import UpdateBatch


class FlowTask:
    kind = "flow"
    reward_weights = None

    def __init__(self, policy: FlowPolicy, cfg, reward_fn, judge, strategy: Strategy):
        self.policy, self.cfg, self.reward_fn, self.judge, self.strategy = policy, cfg, reward_fn, judge, strategy
        self.sigmas = policy.sigmas(cfg.num_steps)
        self.fine = policy.sigmas(cfg.num_steps * cfg.schedule_jitter) if cfg.schedule_jitter else None

    def schedule(self, plan) -> Tensor:
        """The iteration's sigmas: the model's grid, or (schedule jitter) the fine grid at a shared random offset."""
        if self.fine is None:
            return self.sigmas
        offset = int(plan.rng(2).integers(1, self.cfg.schedule_jitter + 1))
        return offset_schedule(self.fine, self.cfg.num_steps, offset)

    def rollout(self, plan) -> Rollout:
        return self.strategy.rollout(self, plan)

    def score(self, ro: Rollout, plan) -> Tensor:
        return self.reward_fn(ro.images, ro.prompts, ro.metadata)

    def advantages(self, ro: Rollout, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return self.strategy.advantages(self, ro, rewards, plan, trainer)

    def estimate(self, ro: Rollout, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return image_advantages(self.judge, ro.images, rewards, plan, trainer, self.cfg)

    def value(self, ro: Rollout, plan, rewards: Tensor | None = None) -> Tensor:
        """What an image is worth, [b]: its reward (``rewards`` when already scored), or with a pairwise judge its
        win rate within its group."""
        if self.judge is not None:
            return group_winrates(self.judge, plan.gather(to_pixels(ro.images)), plan)[plan.indices].double()
        return (rewards if rewards is not None else self.score(ro, plan)).double()

    def metrics(self, ro: Rollout, rewards: Tensor, plan) -> dict[str, float]:
        return self.strategy.metrics(plan)

    def end_iteration(self) -> None:
        self.strategy.end_iteration()

    def report(self, out) -> None:
        self.strategy.report(out)

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)

    def update_batch(self, ro: Rollout, adv: AdvantageResult) -> UpdateBatch:
        s = ro.train_steps.shape[1]
        return UpdateBatch(ro, torch.ones(len(ro), s), adv.advantages, adv.valid, ro.trained_log_probs(), max_len=s)
