"""The one GRPO training skeleton, for every policy: draw prompts, roll out, score, advantages, update, log, checkpoint.

What differs between images and text lives in a `Task` (its policy, how a batch is rolled out and scored, and how
advantages are formed). The trainer owns what they share: the batch layout over processes, gathering rewards so
that advantages see whole groups (groups may span processes), the PPO update, the training state, checkpoints and
logging. Every process holds the same training state; process 0 alone writes files and trackers.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowgrpo.checkpoint import (CheckpointDir, TrainState, load_optimizer_state, optimizer_state, read_training,
                                 training_files)
from flowgrpo.core import TRACKED_ESTIMATORS, AdvantageResult, compute_advantages
from flowgrpo.distributed import Dist
from flowgrpo.policies.ema import WeightEMA
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.samplers.noise import Stream, keyed_rng
from flowgrpo.settings import BatchLayout, GRPOSettings, budget_progress
from flowgrpo.update import ppo_update


@dataclass
class Plan:
    """One iteration as every process sees it: the global rows and groups, and which rows are this process's."""

    iteration: int
    seed: int
    rows: list[dict]  # global: each prompt row repeated group_size times, group members contiguous
    group_ids: Tensor  # [B] global
    indices: Tensor  # [b] global indices of this process's rows, in its local order
    layout: BatchLayout
    dist: Dist

    def local_rows(self) -> list[dict]:
        return [self.rows[i] for i in self.indices.tolist()]

    def rng(self, *keys: int) -> np.random.Generator:
        """A generator every process replays identically for choices that concern the whole iteration."""
        return keyed_rng(self.seed, Stream.PLAN, self.iteration, *keys)

    def gather(self, local: Tensor) -> Tensor:
        """The global tensor [B, ...] (global sample order) from every process's local rows [b, ...]."""
        everyone = self.dist.gather(local.to(self.dist.device)).to(local.device)
        out = torch.empty((len(self.rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        out[self.layout.all_indices().to(local.device)] = everyone
        return out


class UnscorableError(RuntimeError):
    """Too many consecutive iterations without a single scorable sample."""


class Task(Protocol):
    """What a policy kind brings to the trainer."""

    kind: str  # names the checkpoints it can resume ("flow", "mdm", "llm")
    policy: Any  # trainable_module(), bind(module), trainable_parameters(), columns/log_prob/reference_out/kl

    def rollout(self, plan: Plan) -> Any: ...
    def score(self, rollout: Any, plan: Plan) -> Tensor: ...  # [b, K] local rewards, NaN = unscorable
    def advantages(self, rollout: Any, rewards: Tensor, plan: Plan, trainer: "Trainer") -> AdvantageResult: ...
    def update_batch(self, rollout: Any, adv: AdvantageResult) -> UpdateBatch: ...
    def metrics(self, rollout: Any, rewards: Tensor, plan: Plan) -> dict[str, float]: ...  # over all processes
    def end_iteration(self) -> None: ...  # after the update
    def state_dict(self) -> dict: ...  # what the task carries across iterations (JSON)
    def load_state_dict(self, state: dict) -> None: ...
    def tensors(self) -> dict[str, Tensor]: ...  # the tensors it carries (whole; a collective when sharded)
    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None: ...


class Trainer:
    def __init__(self, task: Task, cfg: GRPOSettings, dist: Dist, *, config_json: dict,
                 optimizer: torch.optim.Optimizer | None = None, ema_decay: float = 0.0,
                 resume_keys: Sequence[str] = ("seed", "prompts_per_iter", "group_size"),
                 log: Callable[[dict, int], None] | None = None,
                 log_images: Callable[[dict, int], None] | None = None):
        self.task, self.cfg, self.dist = task, cfg, dist
        self.layout = cfg.layout(dist.world_size)
        self.config_json, self.resume_keys = config_json, tuple(resume_keys)
        policy = task.policy
        if optimizer is not None and cfg.sharding == "fsdp":
            raise ValueError("sharding='fsdp' replaces the parameters: let the trainer make the optimizer")

        def make_optimizer() -> torch.optim.Optimizer:
            return optimizer or cfg.make_optimizer(policy.trainable_parameters())

        self.module, self.optimizer = dist.prepare(policy.trainable_module(), make_optimizer, sharding=cfg.sharding,
                                                   units=policy.shard_units())
        policy.bind(self.module, dist.in_step)
        self.ema = WeightEMA(policy.trainable_module(), ema_decay) if ema_decay else None
        self.state = TrainState()
        self.checkpoints = CheckpointDir(Path(cfg.out) / "checkpoints", cfg.keep)
        self.budget: tuple[int, float] = (0, 0.0)  # (iterations, minutes) the learning-rate schedule spans
        self._log, self._log_images = log, log_images

    # ------------------------------------------------------------------------------------------- one iteration
    def plan(self, prompt_rows: Sequence[dict]) -> Plan:
        if len(prompt_rows) != self.cfg.prompts_per_iter:
            raise ValueError(f"an iteration takes prompts_per_iter={self.cfg.prompts_per_iter} prompts, got "
                             f"{len(prompt_rows)}")
        g = self.cfg.group_size
        rows = [r for r in prompt_rows for _ in range(g)]
        group_ids = torch.arange(len(prompt_rows)).repeat_interleave(g)
        return Plan(self.state.iteration, self.cfg.seed, rows, group_ids, self.layout.local_indices(self.dist.rank),
                    self.layout, self.dist)

    def estimate(self, plan: Plan, rewards: Tensor, *, name: str | None = None, prompt_keys: list[str] | None = None,
                 clip: bool = True, **opts) -> AdvantageResult:
        """Advantages of this process's rows from the rewards of ALL rows (every process computes the same global
        advantages and tracker update, and keeps its own rows). ``rewards`` [b] or [b, K] are local; ``prompt_keys``
        and per-sample ``opts`` (e.g. strata) describe the global batch; ``clip=False`` leaves them unclipped (for a
        sum clipped once)."""
        cfg, name = self.cfg, name or self.cfg.advantage
        everyone = plan.gather(rewards.to(torch.float64))
        opts = {**cfg.advantage_options, **opts}
        if name in TRACKED_ESTIMATORS:
            opts.update(tracker=self.state.tracker, prompt_keys=prompt_keys)
        res = compute_advantages(name, everyone, plan.group_ids, adv_clip=(cfg.adv_clip or None) if clip else None,
                                 zero_std=cfg.zero_std, **opts)
        return AdvantageResult(res.advantages[plan.indices].float(), res.valid[plan.indices], res.stats)

    def step(self, prompt_rows: Sequence[dict]) -> dict[str, float]:
        """One GRPO iteration on ``prompt_rows`` (the same global list on every process): roll out this process's
        rows, score, advantages over all rows, PPO update; then the bookkeeping. Returns the iteration's metrics."""
        t0 = time.perf_counter()
        plan = self.plan(prompt_rows)
        rollout = self.task.rollout(plan)
        t1 = time.perf_counter()
        rewards = self.task.score(rollout, plan)
        adv = self.task.advantages(rollout, rewards, plan, self)
        t2 = time.perf_counter()
        lr = self.cfg.scheduled_lr(self.progress())
        for group in self.optimizer.param_groups:  # a group's lr_scale keeps its ratio to the scheduled lr
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.scorable(adv):
            stats = ppo_update(self.task.policy, self.optimizer, self.module, self.task.update_batch(rollout, adv),
                               self.cfg, self.layout, self.dist)
        else:  # nothing to learn from: the update is skipped, not run on zero weights
            stats = {"skipped": 1.0}
        if self.ema is not None:
            self.ema.update(self.task.policy.trainable_module())
        self.task.end_iteration()
        t3 = time.perf_counter()
        # every process must agree on the clock (time budgets, schedules): the slowest one's
        seconds = float(self.dist.all_reduce(torch.tensor([t3 - t0], dtype=torch.float64, device=self.dist.device),
                                             "max").cpu())
        self.state.iteration += 1
        self.state.train_seconds += seconds
        metrics = {**self.reward_metrics(rewards, plan), **self.task.metrics(rollout, rewards, plan),
                   **{f"adv/{k}": v for k, v in adv.stats.items()}, **stats,
                   "lr": lr, "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2,
                   "seconds_per_iter": seconds, "train_minutes": self.state.train_seconds / 60}
        self.state.history["train"].append({"iteration": self.state.iteration, **metrics})
        self.log(metrics, self.state.iteration)
        return metrics

    def scorable(self, adv: AdvantageResult) -> bool:
        """Whether any sample of the iteration (on any process) carries loss weight; counts the iterations that
        do not, and stops the run after ``max_unscorable`` of them in a row."""
        valid = int(self.dist.all_reduce(adv.valid.sum().to(self.dist.device)).cpu())
        if valid:
            self.state.unscorable_streak = 0
            return True
        self.state.unscorable_streak += 1
        n, limit = self.state.unscorable_streak, self.cfg.max_unscorable
        if n >= limit:
            raise UnscorableError(f"{n} consecutive iterations had no scorable sample (every reward NaN, e.g. a reward "
                                  f"server that is down or a reward that cannot read these images); stopping instead "
                                  f"of training on nothing. The last checkpoint is intact: fix the reward and rerun "
                                  f"to resume (max_unscorable={limit})")
        if self.dist.is_main:
            tqdm.write(f"warning: iteration {self.state.iteration + 1}: no sample could be scored; update skipped "
                       f"({n} in a row, the run stops at {limit})", file=sys.stderr)
        return False

    def log(self, metrics: dict, step: int) -> None:
        """Send metrics to the run's trackers (process 0)."""
        if self._log is not None and self.dist.is_main:
            self._log(metrics, step)

    def log_images(self, images: dict, step: int) -> None:
        """Send named PIL images (evaluation grids, curves) to the run's trackers (process 0)."""
        if self._log_images is not None and self.dist.is_main and images:
            self._log_images(images, step)

    def reward_metrics(self, rewards: Tensor, plan: Plan) -> dict[str, float]:
        """Mean and spread of the (weighted-sum) reward over all processes, and per tag when rows carry tags."""
        r = plan.gather(rewards.to(torch.float64))
        if r.ndim == 2:  # several reward functions: their weighted sum, as the advantages see it
            w = self.task.reward_weights
            r = (r * (torch.tensor(w, dtype=torch.float64) if w is not None else 1.0)).sum(dim=1)
        scored = r[~r.isnan()]
        out = {"reward_mean": float(scored.mean()) if scored.numel() else math.nan,
               "reward_std": float(scored.std(correction=0)) if scored.numel() else math.nan,
               "reward_nan_frac": float(r.isnan().float().mean())}
        tags = [row.get("tag") for row in plan.rows]
        for tag in sorted({t for t in tags if isinstance(t, str)}):
            out[f"reward/{tag}"] = float(r[torch.tensor([t == tag for t in tags])].nanmean())
        return out

    def progress(self) -> float:
        """Fraction of the budget (set by `fit`) used."""
        return budget_progress(self.state.iteration, self.state.train_seconds, *self.budget)

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self, draw: Callable[[int], Sequence[dict]], *, iterations: int, max_minutes: float = 0.0,
            after_step: Callable[[dict], None] | None = None, progress: bool = True, desc: str = "grpo") -> list[dict]:
        """Iterate until ``iterations`` in total (counting those before a resume) or ``max_minutes`` of training;
        ``draw(i)`` gives iteration i's prompt rows. Checkpoints every ``save_every`` iterations and at the end."""
        self.budget = (iterations, max_minutes)
        out = []
        with tqdm(total=iterations, initial=min(self.state.iteration, iterations), desc=desc,
                  disable=not (progress and self.dist.is_main)) as bar:  # closed before any error is reported
            while self.state.iteration < iterations:
                if max_minutes and self.state.train_seconds >= 60 * max_minutes:
                    if self.dist.is_main:
                        tqdm.write(f"time budget reached ({max_minutes} min of training)")
                    break
                metrics = self.step(draw(self.state.iteration))
                out.append(metrics)
                if len(out) == 3 and self.dist.is_main:  # a first estimate, once the warm-up is behind
                    per_it = statistics.median(m["seconds_per_iter"] for m in out)
                    tqdm.write(f"{per_it:.1f} s per iteration: about {per_it * (iterations - self.state.iteration) / 60:.0f}"
                               f" min of training to go for {iterations} iterations (evaluations not included)")
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", clip=f"{metrics.get('clip_frac', 0):.2f}")
                if after_step is not None:
                    after_step(metrics)
                if self.cfg.save_every and self.cfg.out and self.state.iteration % self.cfg.save_every == 0:
                    self.save()
        return out

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint (process 0; the others wait): into out/checkpoints/iter-N, or at ``path``."""
        from flowgrpo.checkpoint import write_checkpoint_dir

        where = None
        self.state.strategy = self.task.state_dict()
        module = self.task.policy.trainable_module()
        # gathered on every process (collectives when sharded), written by process 0
        weights, optim = self.task.policy.trainable_state_dict(), optimizer_state(module, self.optimizer)
        ema = self.ema.full() if self.ema is not None else None
        carried = self.task.tensors()
        if self.dist.is_main:
            files = training_files(weights, optim, self.state, kind=self.task.kind, config=self.config_json, ema=ema,
                                   strategy=carried)
            where = (self.checkpoints.save(self.state.iteration, files) if path is None
                     else write_checkpoint_dir(Path(path), files))
        self.dist.barrier()
        return where

    def load(self, path: str | Path) -> None:
        """Restore weights, optimizer, EMA and training state from a checkpoint directory."""
        loaded = read_training(path, kind=self.task.kind, check_config=lambda saved: self._check_resume(path, saved))
        self.task.policy.load_trainable_state_dict(loaded.weights, where=str(path))
        load_optimizer_state(self.task.policy.trainable_module(), self.optimizer, loaded.optimizer_state, str(path))
        if (loaded.ema is None) != (self.ema is None):
            raise ValueError(f"{path}: the checkpoint {'has' if loaded.ema is not None else 'has no'} weight EMA, "
                             f"this run {'keeps' if self.ema is not None else 'keeps no'} one")
        if self.ema is not None:  # the average is updated once per iteration from the start
            self.ema.load(loaded.ema, updates=loaded.state.iteration, where=str(path))
        self.task.load_state_dict(loaded.state.strategy)
        self.task.load_tensors(loaded.strategy, str(path))
        self.state = loaded.state

    def resume(self) -> Path | None:
        """Continue from the newest complete checkpoint of this run, if any (and cfg.resume)."""
        newest = self.checkpoints.newest() if self.cfg.resume else None
        if newest is not None:
            self.load(newest)
            if self.dist.is_main:
                tqdm.write(f"resumed from {newest} (iteration {self.state.iteration})")
        return newest

    def _check_resume(self, path, saved: dict) -> None:
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {self.config_json.get(k)!r}"
                   for k in self.resume_keys if saved.get(k) != self.config_json.get(k)]
        if changed:
            raise ValueError(f"cannot resume {path} with a different data order or grouping: " + "; ".join(changed))


def settings_json(cfg) -> dict:
    """A config as JSON-able values (for checkpoints and the run's config.json)."""
    return json_safe(asdict(cfg))


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
