"""Small builders the trainer tests share: one-process plans, one PPO update, a trainer around a tiny pipeline."""
from __future__ import annotations

import functools

import torch

from flowgrpo.config import TrainConfig
from flowgrpo.distributed import Dist
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.settings import GRPOSettings
from flowgrpo.strategies import STRATEGIES, ImageScoring
from flowgrpo.train import build_trainer
from flowgrpo.trainer import Plan, Trainer
from flowgrpo.update import ppo_update


@functools.cache
def single() -> Dist:
    """This test process as a one-process run."""
    return Dist.create()


def make_plan(prompt_rows: list[dict], group_size: int, *, iteration: int = 0, seed: int = 0) -> Plan:
    """The one-process plan of an iteration over ``prompt_rows`` (each repeated group_size times)."""
    layout = GRPOSettings(prompts_per_iter=len(prompt_rows), group_size=group_size, micro_batch=0).layout(1)
    rows = [r for r in prompt_rows for _ in range(group_size)]
    return Plan(iteration, seed, rows, torch.arange(len(prompt_rows)).repeat_interleave(group_size),
                layout.local_indices(0), layout, single())


def one_update(policy, optimizer, ro, adv, steps: torch.Tensor, cfg: GRPOSettings) -> dict:
    """`ppo_update` of one process on a flow rollout, training the per-row steps ``steps`` ([S] or [B, S])."""
    ro.train_steps = steps.expand(len(ro), steps.shape[-1]).clone()
    s = ro.train_steps.shape[1]
    batch = UpdateBatch(ro, torch.ones(len(ro), s), adv.advantages, adv.valid, ro.trained_log_probs(), max_len=s)
    return ppo_update(policy, optimizer, policy.trainable_module(), batch, cfg, cfg.layout(1), single())


def flow_trainer(cfg: TrainConfig) -> Trainer:
    """The trainer `flowgrpo train` builds for ``cfg``, in this process (its task is the run's strategy)."""
    return build_trainer(cfg, single())


def strategy_of(cfg: TrainConfig, policy, reward_fn=None):
    """``cfg``'s strategy on ``policy`` (scored by ``reward_fn``), outside a trainer."""
    return STRATEGIES[cfg.strategy](policy, cfg.strategy_options, cfg.sampling, ImageScoring(reward_fn))
