"""The flow-matching image task of the trainer: roll out, score and form advantages for a diffusers flow policy.

Every random draw is keyed by the global sample (see `flowgrpo.samplers.noise`): sample i of iteration t starts from
noise keyed (seed, t, i) — or (seed, t, group) when a group shares its initial noise — and its SDE step k draws noise
keyed (seed, t, i, k), so a process makes exactly the images a single process would make for the same samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.policies.flow import FlowPolicy, Rollout
from flowgrpo.pref import pref_advantages
from flowgrpo.samplers.noise import KeyedNoise, Stream, keyed_normal
from flowgrpo.samplers.schedules import offset_schedule
from flowgrpo.strategies import Strategy
from flowgrpo.update import UpdateBatch


def initial_noise(cfg, plan, shape: tuple[int, ...]) -> Tensor:
    """x_T of this process's rows [b, *shape]: keyed by group when the members share it, else by sample."""
    keys = plan.group_ids[plan.indices] if cfg.shared_noise else plan.indices
    per = int(cfg.shared_noise)  # a group's draw is not sample 0's
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
        cfg, idx = self.cfg, plan.indices
        rows = plan.local_rows()
        mask = self.strategy.sde_mask(plan)
        local_mask = mask[idx] if mask.ndim == 2 else mask
        ro = self.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx],
                                 initial_noise(cfg, plan, self.policy.latent_shape()), sigmas=self.schedule(plan),
                                 sde_mask=local_mask, guidance=cfg.guidance, kind=cfg.sde_kind,
                                 noise_level=cfg.noise_level, noise=sde_noise(cfg, plan), noise_freqs=cfg.noise_freqs)
        ro.train_steps = self.strategy.train_steps(ro.sde_mask.expand(len(ro), cfg.num_steps), plan)
        return ro

    def score(self, ro: Rollout, plan) -> Tensor:
        return self.reward_fn(ro.images, ro.prompts, ro.metadata)

    def advantages(self, ro: Rollout, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return self.strategy.advantages(self, ro, rewards, plan, trainer)

    def estimate(self, ro: Rollout, rewards: Tensor, plan, trainer) -> AdvantageResult:
        """Advantages of one set of images: Pref-GRPO win rates when a judge is set, else the pointwise estimator."""
        pointwise = None
        if self.judge is None or self.cfg.pointwise_weight > 0:
            pointwise = trainer.estimate(plan, rewards, prompt_keys=[r["prompt"] for r in plan.rows])
        if self.judge is None:
            return pointwise
        return pref_advantages(self.judge, ro.images, plan, self.cfg, pointwise)

    def metrics(self, ro: Rollout, rewards: Tensor, plan) -> dict[str, float]:
        return {}

    def update_batch(self, ro: Rollout, adv: AdvantageResult) -> UpdateBatch:
        s = ro.train_steps.shape[1]
        return UpdateBatch(ro, torch.ones(len(ro), s), adv.advantages, adv.valid, ro.trained_log_probs(), max_len=s)
