"""GRPO for text LLMs from Python, on the same algorithm core that trains images.

    from flowgrpo.llm import GRPO
    trainer = GRPO(model, tokenizer, reward_fns=[my_reward], advantage="grpo",
                   loss_agg="seq-mean-token-mean", num_generations=8, beta=0.0)
    trainer.train(dataset)            # list of dicts or datasets.Dataset, each with a "prompt"
    metrics = trainer.step(batch)     # or drive it yourself, one batch of prompts per call

Reward functions use TRL's signature ``fn(prompts, completions, completion_ids, **columns) ->
list[float | None]``: every dataset column other than ``prompt`` is passed by name (one value per
completion); None marks an unscorable completion (NaN reward, zero loss weight). Several
functions give a [B, K] reward matrix (``reward_weights`` combine it; ``advantage="gdpo"``
normalises each column). A ``strata`` column feeds ``advantage="stratified"``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from flowgrpo.core import TRACKED_ESTIMATORS, PromptStatTracker, compute_advantages, k3_kl, loss_weights, ppo_clip_loss
from flowgrpo.llm_config import GRPOConfig
from flowgrpo.policies.llm import LLMPolicy, TokenRollout, load_causal_lm

__all__ = ["GRPO", "GRPOConfig", "micro_batch_loss"]

RewardFn = Callable[..., Sequence[float | None]]
_RESERVED_COLUMNS = {"prompts", "completions", "completion_ids"}
_RESUME_KEYS = ("prompts_per_step", "num_generations", "seed")  # fix the data order and groups


def micro_batch_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, *, eps_low: float,
    eps_high: float, beta: float = 0.0, ref_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum(W · (PPO-clip + beta · k3 KL)) for one micro-batch; ``weights`` is this micro-batch's
    slice of the optimizer step's ``loss_weights``, so summing over micro-batches gives the step
    loss whatever the split. Returns (loss, stats) with ``kl`` = the mean k3 over masked tokens."""
    mask = weights != 0
    elem, stats = ppo_clip_loss(logp, old_logp, advantages, eps_low, eps_high, mask=mask)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        elem = elem + beta * kl
        stats["kl"] = kl.detach()[mask].mean() if bool(mask.any()) else kl.new_tensor(float("nan"))
    return (weights * elem).sum(), stats


def _floats(values: Sequence[float | None], n: int, name: str) -> list[float]:
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} values for {n} completions")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (bool, int, float)) or (isinstance(v, Tensor) and v.numel() == 1):
            out.append(float(v))
        else:
            raise TypeError(f"reward function {name} returned {type(v).__name__}; expected float or None")
    return out


def _dense_ids(values: Sequence) -> Tensor:
    """Integer ids for arbitrary hashable stratum labels (sorted by their string form)."""
    labels = sorted({str(v) for v in values})
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[str(v)] for v in values])


class GRPO:
    """GRPO trainer for a causal LM (a model object, or a local directory to load one from).

    Keyword arguments are ``GRPOConfig`` fields (or pass ``config=``). With beta > 0 the
    reference is the LoRA-disabled model for peft models, else ``ref_model`` or a frozen copy.
    The model is put in eval mode (no dropout) so recomputed log-probs are deterministic.
    """

    def __init__(
        self, model, tokenizer=None, reward_fns: RewardFn | Sequence[RewardFn] = (), *,
        config: GRPOConfig | None = None, ref_model=None, optimizer: torch.optim.Optimizer | None = None,
        **overrides,
    ) -> None:
        unknown = sorted(set(overrides) - {f.name for f in fields(GRPOConfig)})
        if unknown:
            raise TypeError(f"unknown GRPO settings {unknown}; see flowgrpo.llm.GRPOConfig")
        self.config = cfg = replace(config or GRPOConfig(), **overrides)
        if isinstance(model, (str, Path)):
            model, loaded = load_causal_lm(model)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("a tokenizer is needed with a model object")
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not self.reward_fns or not all(callable(f) for f in self.reward_fns):
            raise ValueError("reward_fns must be one or more callables fn(prompts, completions, **columns)")
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(self.reward_fns):
            raise ValueError(f"reward_weights has {len(cfg.reward_weights)} entries for "
                             f"{len(self.reward_fns)} reward functions")
        model.eval()
        policy = LLMPolicy(model, tokenizer, cfg.sampling, ref_model=ref_model)
        if cfg.beta > 0 and ref_model is None and not policy.is_peft:
            policy.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.policy = policy
        self.optimizer = optimizer or torch.optim.AdamW(
            policy.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(device=policy.device).manual_seed(cfg.seed)
        self.tracker = PromptStatTracker()
        self.step_count = 0       # optimizer updates are step_count * num_iterations
        self.epoch = 0            # data position: epoch and batches consumed in it
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []

    # ---- one step ----------------------------------------------------------------------------
    def _score(self, prompts: list, rollout: TokenRollout, rows: list[Mapping]) -> Tensor:
        """Rewards [B, K] (float64, NaN = unscorable) from every reward function."""
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise ValueError("all dataset rows must have the same columns")
        clash = _RESERVED_COLUMNS & keys
        if clash:
            raise ValueError(f"dataset columns {sorted(clash)} clash with reward-function arguments")
        columns = {k: [r[k] for r in rows] for k in keys if k != "prompt"}
        chat = isinstance(prompts[0], list)
        completions = ([[{"role": "assistant", "content": c}] for c in rollout.completions]
                       if chat else list(rollout.completions))
        ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask)]
        cols = []
        for fn in self.reward_fns:
            name = getattr(fn, "__name__", repr(fn))
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
            cols.append(_floats(list(values), len(prompts), name))
        return torch.tensor(cols, dtype=torch.float64).T

    def _advantage_opts(self, prompts: list, rows: list[Mapping]) -> dict:
        opts = dict(self.config.advantage_opts)
        if self.config.advantage in TRACKED_ESTIMATORS:
            opts.update(tracker=self.tracker, prompt_keys=[json.dumps(p, sort_keys=True) for p in prompts])
        if self.config.advantage == "stratified":
            if "strata" not in rows[0]:
                raise ValueError("advantage='stratified' needs a 'strata' column in the dataset")
            opts["strata"] = _dense_ids([r["strata"] for r in rows])
        return opts

    def step(self, batch: Sequence[Mapping]) -> dict[str, float]:
        """Sample G completions per prompt, score them and make ``num_iterations`` optimizer steps.

        ``batch``: ``prompts_per_step`` rows, each a mapping with a ``prompt``. Returns metrics.
        """
        cfg = self.config
        rows = list(batch)
        if len(rows) != cfg.prompts_per_step:
            raise ValueError(f"step got {len(rows)} prompts; the config has prompts_per_step={cfg.prompts_per_step}")
        if any("prompt" not in r for r in rows):
            raise ValueError("every row needs a 'prompt' (text or chat messages)")
        t0 = time.perf_counter()
        rows = [r for r in rows for _ in range(cfg.num_generations)]
        prompts = [r["prompt"] for r in rows]
        rollout = self.policy.rollout(prompts, self.generator)
        t1 = time.perf_counter()
        rewards = self._score(prompts, rollout, rows)
        group_ids = torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.num_generations)
        adv = compute_advantages(cfg.advantage, rewards, group_ids, adv_clip=cfg.adv_clip, zero_std=cfg.zero_std,
                                 reward_weights=cfg.reward_weights, **self._advantage_opts(prompts, rows))
        t2 = time.perf_counter()
        metrics = self._optimize(rollout, adv.advantages, adv.valid)
        self.step_count += 1
        t3 = time.perf_counter()

        weights = torch.tensor(cfg.reward_weights or [1.0] * rewards.shape[1], dtype=torch.float64)
        combined = (rewards * weights).sum(dim=1)
        scored = combined[~combined.isnan()]
        out = {"step": float(self.step_count), "reward": float(combined.nanmean()),
               "reward_std": float(scored.std(correction=0)) if scored.numel() else math.nan}
        for k, fn in enumerate(self.reward_fns):
            out[f"reward/{getattr(fn, '__name__', k)}"] = float(rewards[:, k].nanmean())
        out.update({f"adv/{k}": v for k, v in adv.stats.items()})
        out.update(metrics)
        out.update(completion_len=float(rollout.completion_mask.sum(1).float().mean()),
                   frac_stopped=float(rollout.stopped.float().mean()), time_rollout=t1 - t0,
                   time_reward=t2 - t1, time_train=t3 - t2, time_step=t3 - t0)
        self.history.append(out)
        return out

    def _optimize(self, rollout: TokenRollout, advantages: Tensor, valid: Tensor) -> dict[str, float]:
        """The inner PPO epochs on one rollout batch; the loss weights span the whole batch."""
        cfg, policy = self.config, self.policy
        mask = rollout.completion_mask
        weights = loss_weights(mask, cfg.loss_agg, valid=valid.to(mask.device),
                               max_len=cfg.max_new_tokens, dtype=torch.float32)
        advantages = advantages.to(device=mask.device, dtype=torch.float32)
        chunks = [slice(i, i + cfg.micro_batch) for i in range(0, cfg.batch_size, cfg.micro_batch)]
        # beta = 0: the reference is never run
        ref = [policy.ref_log_prob(rollout.select(c)) for c in chunks] if cfg.beta > 0 else [None] * len(chunks)
        active = weights != 0
        n_active = max(int(active.sum()), 1)
        params = policy.trainable_parameters()
        old: list[Tensor] = []
        m = {"loss": 0.0, "clip_frac": 0.0, "sampler_logp_max_diff": 0.0}
        ratio_min, ratio_max = [], []
        if cfg.beta > 0:
            m["kl"] = 0.0
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for j, c in enumerate(chunks):
                sub = rollout.select(c)
                logp = policy.log_prob(sub)
                if it == 0:  # the policy has not moved yet: these are the behaviour log-probs
                    old.append(logp.detach())
                    diff = (logp.detach() - sub.sample_logp).abs().max()
                    m["sampler_logp_max_diff"] = max(m["sampler_logp_max_diff"], float(diff))
                loss, st = micro_batch_loss(logp, old[j], advantages[c], weights[c], eps_low=cfg.eps_low,
                                            eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref[j])
                loss.backward()
                share = int(active[c].sum()) / n_active
                if share == 0:
                    continue
                m["clip_frac"] += float(st["clip_frac"]) * share / cfg.num_iterations
                ratio_min.append(float(st["ratio_min"]))
                ratio_max.append(float(st["ratio_max"]))
                if it == 0:
                    m["loss"] += float(loss.detach())
                    if cfg.beta > 0:
                        m["kl"] += float(st["kl"]) * share
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            self.optimizer.step()
        m["ratio_min"] = min(ratio_min, default=math.nan)
        m["ratio_max"] = max(ratio_max, default=math.nan)
        return m

    # ---- training loop -----------------------------------------------------------------------
    def _epoch_order(self, n: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def train(self, dataset, *, num_steps: int | None = None, epochs: int = 1,
              progress: bool = True) -> list[dict[str, float]]:
        """Train on ``dataset`` (list of dicts or ``datasets.Dataset``) until ``num_steps`` steps in
        total (counting steps before a resume) or ``epochs`` passes; shuffled per epoch from the
        seed, the last partial batch dropped. Returns the metrics of the steps run here."""
        cfg = self.config
        per_epoch = len(dataset) // cfg.prompts_per_step
        if per_epoch == 0:
            raise ValueError(f"dataset has {len(dataset)} rows, fewer than prompts_per_step={cfg.prompts_per_step}")
        total = num_steps if num_steps is not None else epochs * per_epoch
        out = []
        bar = tqdm(total=total, initial=min(self.step_count, total), disable=not progress, desc="grpo")
        while self.step_count < total:
            start = self.batch_in_epoch * cfg.prompts_per_step
            order = self._epoch_order(len(dataset))[start:start + cfg.prompts_per_step]
            metrics = self.step([dataset[i] for i in order])
            self.batch_in_epoch += 1
            if self.batch_in_epoch == per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            out.append(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['completion_len']:.1f}")
            if cfg.save_every and self.step_count % cfg.save_every == 0:
                self.save_checkpoint(Path(cfg.output_dir) / f"checkpoint-{self.step_count}")
        bar.close()
        if cfg.output_dir is not None and out:
            self.save_checkpoint(Path(cfg.output_dir) / f"checkpoint-{self.step_count}")
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Trainable weights (safetensors), optimizer state (torch.save), sampling RNG
        (safetensors) and the JSON state: step, data position, tracker, config."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save(path / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        save_file({"sampling": self.generator.get_state()}, str(path / "rng.safetensors"))
        state = {"format": 1, "step": self.step_count, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "tracker": self.tracker.state_dict(), "config": asdict(self.config)}
        (path / "state.json").write_text(json.dumps(state, indent=1, default=str))
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume exactly from ``save_checkpoint`` output (same base model and data)."""
        path = Path(path)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint (no state.json)")
        state = json.loads((path / "state.json").read_text())
        saved = state["config"]
        changed = [f"{k}: checkpoint {saved[k]!r} vs now {getattr(self.config, k)!r}"
                   for k in _RESUME_KEYS if saved[k] != getattr(self.config, k)]
        if changed:
            raise ValueError("cannot resume with a different data order/grouping: " + "; ".join(changed))
        self.policy.load(path / "trainable.safetensors")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.generator.set_state(load_file(str(path / "rng.safetensors"))["sampling"])
        self.tracker.load_state_dict(state["tracker"])
        self.step_count, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]

    def save_model(self, path: str | Path) -> None:
        """Export the model (or LoRA adapter) and tokenizer with ``save_pretrained``."""
        self.policy.model.save_pretrained(path)
        self.policy.tokenizer.save_pretrained(path)
