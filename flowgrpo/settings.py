"""The settings every GRPO trainer shares (images and text alike), one name per concept, and the batch layout.

`GRPOSettings` is the base of `TrainConfig` (`flowgrpo train`) and `GRPOConfig` (the LLM Python API). Batch sizes
are GLOBAL: an iteration trains on `prompts_per_iter` prompts x `group_size` samples whatever the number of
processes, and `layout(processes)` splits them — so a run's result does not depend on how many processes run it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from flowgrpo.core import ADVANTAGES, AGGREGATIONS

LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent with another."""


def opt(default=dataclasses.MISSING, help: str = "", *, factory=None):
    """A settings field with its `--help` text."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def budget_progress(iteration: int, seconds: float, iterations: int, minutes: float) -> float:
    """Fraction of a training budget used: iterations or training minutes (0 = no limit), whichever runs out first."""
    done = iteration / iterations if iterations else 0.0
    if minutes:
        done = max(done, seconds / (60 * minutes))
    return min(done, 1.0)


@dataclass(frozen=True)
class BatchLayout:
    """How one iteration's samples are split: over processes, then optimizer steps, then forward passes.

    Global sample i (prompt-major: group members are contiguous) belongs to optimizer step
    i // (samples / optimizer_steps); each optimizer step's slice is cut into one contiguous piece per process.
    Every optimizer step therefore sees the same samples on any number of processes.
    """

    samples: int  # per iteration, all processes
    processes: int
    optimizer_steps: int
    micro_batch: int  # rows per forward pass

    @property
    def per_process(self) -> int:
        return self.samples // self.processes

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step on one process."""
        return self.samples // (self.processes * self.optimizer_steps)

    @property
    def micro_batches_per_step(self) -> int:
        return self.rows_per_step // self.micro_batch

    def local_indices(self, rank: int) -> torch.Tensor:
        """Global sample indices held by process ``rank``, in its local order (optimizer step by optimizer step)."""
        step = self.samples // self.optimizer_steps
        return torch.cat([torch.arange(o * step + rank * self.rows_per_step, o * step + (rank + 1) * self.rows_per_step)
                          for o in range(self.optimizer_steps)])

    def all_indices(self) -> torch.Tensor:
        """``local_indices`` of every rank, concatenated in rank order (the order `Dist.gather` returns)."""
        return torch.cat([self.local_indices(r) for r in range(self.processes)])


@dataclass(frozen=True)
class GRPOSettings:
    seed: int = opt(0, "seed of every random stream (prompts, rollout noise, evaluation noise)")
    out: str = opt("runs/shapes-grpo", "run directory: checkpoints, evaluations, grids, TensorBoard, final model")
    # groups and batches (global: the same whatever the number of processes)
    prompts_per_iter: int = opt(12, "prompts per iteration, over all processes")
    group_size: int = opt(8, "samples per prompt (G)")
    micro_batch: int = opt(24, "rows per forward pass on one process (0 = all rows of its optimizer step)")
    optimizer_steps: int = opt(1, "optimizer steps per iteration (the batch is split between them)")
    inner_epochs: int = opt(1, "passes over each iteration's batch (PPO epochs)")
    # advantages (flowgrpo.core.compute_advantages)
    advantage: str = opt("grpo", f"advantage estimator: {', '.join(sorted(ADVANTAGES))}")
    advantage_options: dict = opt(factory=dict, help="estimator options, e.g. {scale: none} (Dr.GRPO)")
    adv_clip: float = opt(5.0, "clip advantages to [-c, c]; 0 = no clipping")
    zero_std: str = opt("keep", "groups whose rewards are all equal: keep (the estimator's value, 0 for grpo) or "
                                "drop (left out of the loss)")
    # loss
    loss_agg: str = opt("token-mean", f"loss aggregation over samples and steps: {', '.join(AGGREGATIONS)}")
    clip_low: float = opt(1e-3, "PPO clip: lower epsilon of the importance ratio")
    clip_high: float = opt(1e-3, "PPO clip: upper epsilon of the importance ratio")
    beta: float = opt(0.02, "KL to the reference model; 0 never runs the reference")
    # optimizer
    optim: str = opt("adamw", f"optimizer: adamw, or sgd (momentum {SGD_MOMENTUM}; weight_decay is then an L2 term): "
                              "SGD's step is linear in the gradient, so runs whose gradients differ only in rounding "
                              "(1 vs N processes) stay as close as their gradients")
    lr: float = opt(3e-5, "learning rate")
    lr_schedule: str = opt("constant", "learning rate over the budget: constant, linear or cosine decay to "
                                       "lr_final x lr")
    lr_final: float = opt(0.1, "the decaying schedules end at this fraction of lr")
    weight_decay: float = opt(0.0, "weight decay")
    grad_clip: float = opt(1.0, "gradient-norm clip; 0 = none")
    max_unscorable: int = opt(3, "stop with an error after this many consecutive iterations in which no sample could "
                                 "be scored (every reward NaN, e.g. a reward server that is down); their updates are "
                                 "skipped")
    sharding: str = opt("ddp", "several processes: ddp (every process holds the model; gradients are all-reduced) or "
                               "fsdp (parameters, gradients and optimizer state sharded over the processes, FSDP2)")
    # checkpoints
    save_every: int = opt(50, "checkpoint every n iterations (0 = only at the end)")
    keep: int = opt(2, "complete checkpoints kept (the newest n)")
    resume: bool = opt(True, "resume from the newest complete checkpoint in out/checkpoints when there is one")

    def __post_init__(self) -> None:
        for name in ("prompts_per_iter", "group_size", "optimizer_steps", "inner_epochs", "keep", "max_unscorable"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch", "save_every", "seed", "clip_low", "clip_high", "beta", "lr", "adv_clip",
                     "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"unknown advantage {self.advantage!r}; choose from {sorted(ADVANTAGES)}")
        if self.group_size < 2 and self.advantage != "spo":
            raise ConfigError(f"advantage {self.advantage!r} compares the samples of a group: group_size must be "
                              f">= 2, got {self.group_size} (only 'spo' needs no group)")
        reserved = {"tracker", "prompt_keys", "strata"} & set(self.advantage_options)
        if reserved:
            raise ConfigError(f"advantage_options {sorted(reserved)} are supplied by the trainer, not the config")
        if self.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"unknown loss_agg {self.loss_agg!r}; choose from {sorted(AGGREGATIONS)}")
        if self.sharding not in ("ddp", "fsdp"):
            raise ConfigError(f"sharding must be 'ddp' or 'fsdp', got {self.sharding!r}")
        if self.zero_std not in ("keep", "drop"):
            raise ConfigError(f"zero_std must be 'keep' or 'drop', got {self.zero_std!r}")
        if not self.clip_low < 1:
            raise ConfigError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim {self.optim!r} is not one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if not 0 <= self.lr_final <= 1:
            raise ConfigError(f"lr_final must be in [0, 1], got {self.lr_final}")
        self.layout(1)

    @property
    def batch_size(self) -> int:
        """Samples per iteration, over all processes."""
        return self.prompts_per_iter * self.group_size

    def layout(self, processes: int) -> BatchLayout:
        """The split of an iteration over ``processes``; the error names the numbers that disagree."""
        n, steps = self.batch_size, self.optimizer_steps
        what = (f"samples per iteration = prompts_per_iter x group_size = {self.prompts_per_iter} x {self.group_size}"
                f" = {n}")
        if n % (processes * steps):
            raise ConfigError(f"{what} do not split evenly over {processes} process(es) x optimizer_steps={steps}")
        rows = n // (processes * steps)
        micro = self.micro_batch or rows
        if rows % micro:
            raise ConfigError(f"{what}: each of {processes} process(es) holds {rows} samples per optimizer step "
                              f"(optimizer_steps={steps}), not a multiple of micro_batch={self.micro_batch}")
        return BatchLayout(n, processes, steps, micro)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (tensors, or param groups with their own lr)."""
        if self.optim == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=SGD_MOMENTUM, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def scheduled_lr(self, progress: float) -> float:
        """The learning rate at ``progress`` in [0, 1] of the budget: constant, or a linear / cosine decay from lr
        to lr_final x lr (progress, not steps: a wall-clock budget leaves the iteration count open)."""
        if self.lr_schedule == "constant":
            return self.lr
        decay = 1 - progress if self.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.lr_final + (1 - self.lr_final) * decay)
