"""One GRPO policy update on a batch of flow rollouts (PPO-clip over SDE steps, optional KL)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from flowgrpo.config import TrainConfig
from flowgrpo.core import AdvantageResult, gaussian_mean_kl, loss_weights, ppo_clip_loss
from flowgrpo.policies.flow import FlowPolicy, Rollout
from flowgrpo.samplers.rollout import dance_train_steps


def budget_progress(cfg: TrainConfig, iteration: int, train_seconds: float) -> float:
    """Fraction of the training budget used: iterations or training minutes, whichever runs out first."""
    done = iteration / cfg.iterations
    if cfg.max_minutes:
        done = max(done, train_seconds / (60 * cfg.max_minutes))
    return min(done, 1.0)


def scheduled_lr(cfg: TrainConfig, progress: float) -> float:
    """The learning rate at `progress` in [0, 1] of the budget: constant, or a linear / cosine decay from lr to
    lr_final x lr. A wall-clock budget makes the iteration count unknown up front, hence progress, not steps."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay = 1 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * decay)


def train_step_indices(ro: Rollout, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-row SDE steps to train on, ``[B, S]``: all of a row's SDE steps, or a random subset of
    `train_steps` of them, the same for every row (DanceGRPO). Every row must have the same number of SDE steps."""
    mask = ro.sde_mask.expand(len(ro), ro.sde_mask.shape[-1])
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError(f"every row needs the same, nonzero number of SDE steps; got {sorted(set(counts.tolist()))}")
    steps = torch.nonzero(mask)[:, 1].view(len(ro), -1)
    if cfg.train_steps and cfg.train_steps < steps.shape[1]:
        steps = steps[:, dance_train_steps(steps.shape[1], cfg.train_steps, generator)]
    return steps


def grpo_update(policy: FlowPolicy, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                ro: Rollout, adv: AdvantageResult, steps: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """PPO-clip updates over `optimizer_steps` slices of the batch, `inner_epochs` times, on the per-row
    SDE steps `steps` [B, S] (see `train_step_indices`; [S] = the same steps for every row).

    Each optimizer step builds its loss weights W from all of its rows and steps first, then
    backpropagates micro-batch by micro-batch and step by step: the gradient is exactly that of
    the whole slice, whatever the micro-batch size.
    """
    steps = steps.expand(len(ro), steps.shape[-1])
    rows_per_step = cfg.micro_batches_per_step * cfg.micro_batch
    sums: dict[str, list[float]] = defaultdict(list)
    for _ in range(cfg.inner_epochs):
        for o in range(cfg.optimizer_steps):
            lo = o * rows_per_step
            mask = torch.ones(rows_per_step, steps.shape[1])
            W = loss_weights(mask, cfg.loss_agg, valid=adv.valid[lo : lo + rows_per_step])
            for m in range(lo, lo + rows_per_step, cfg.micro_batch):
                rows = slice(m, m + cfg.micro_batch)
                w_rows = W[m - lo : m - lo + cfg.micro_batch]
                for k in range(steps.shape[1]):
                    j = steps[rows, k]
                    logp, mean, std = policy.step_log_prob(ro, rows, j, cfg.guidance)
                    old = ro.log_probs[rows].gather(1, j[:, None]).squeeze(1)
                    loss, st = ppo_clip_loss(logp[:, None], old[:, None], adv.advantages[rows],
                                             cfg.clip_low, cfg.clip_high)
                    if cfg.beta > 0:
                        with torch.no_grad(), policy.reference() as ref:
                            _, ref_mean, _ = policy.step_log_prob(ro, rows, j, cfg.guidance, transformer=ref, grad=False)
                        kl = gaussian_mean_kl(mean, ref_mean, std)
                        loss = loss + cfg.beta * kl[:, None]
                        sums["kl"].append(float(kl.detach().mean()))
                    (loss * w_rows[:, k : k + 1]).sum().backward()
                    for name, value in st.items():
                        sums[name].append(float(value))
            sums["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    out = {k: sum(v) / len(v) for k, v in sums.items() if k not in ("ratio_min", "ratio_max")}
    if sums["ratio_min"]:
        out["ratio_min"], out["ratio_max"] = min(sums["ratio_min"]), max(sums["ratio_max"])
    return out
