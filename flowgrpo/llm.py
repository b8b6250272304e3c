"""GRPO for text LLMs from Python, on the same trainer and algorithm core that train images.

    from flowgrpo.llm import GRPO
    trainer = GRPO(model, tokenizer, reward_fns=[my_reward], advantage="grpo",
                   loss_agg="seq-mean-token-mean", group_size=8, beta=0.0)   # TRL's names work too
    trainer.train(dataset)            # list of dicts or datasets.Dataset, each with a "prompt"
    metrics = trainer.step(batch)     # or drive it yourself, one batch of prompts per call

Reward functions use TRL's signature ``fn(prompts, completions, completion_ids, **columns) ->
list[float | None]``: every dataset column other than ``prompt`` is passed by name (one value per
completion); None marks an unscorable completion (NaN reward, zero loss weight). Several
functions give a [B, K] reward matrix (``reward_weights`` combine it; ``advantage="gdpo"``
normalises each column). A ``strata`` column feeds ``advantage="stratified"``.

Several processes: run the same script under ``torchrun --nproc_per_node N`` or ``accelerate launch``; batch
sizes are global, each process samples its share of every group, and the result does not depend on N.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.distributed import Dist
from flowgrpo.llm_config import GRPOConfig
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.policies.llm import LLMPolicy, TokenRollout, load_causal_lm
from flowgrpo.samplers.noise import Stream, keyed_generator
from flowgrpo.trainer import Trainer, settings_json

__all__ = ["GRPO", "GRPOConfig", "TextTask"]

RewardFn = Callable[..., Sequence[float | None]]
_RESERVED_COLUMNS = {"prompts", "completions", "completion_ids"}


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


class TextTask:
    """Completions of a causal LM, scored by TRL-style reward functions."""

    kind = "llm"

    def __init__(self, policy: LLMPolicy, cfg: GRPOConfig, reward_fns: list[RewardFn]):
        self.policy, self.cfg, self.reward_fns = policy, cfg, reward_fns
        self.reward_weights = cfg.reward_weights
        self.reward_names = [getattr(fn, "__name__", str(k)) for k, fn in enumerate(reward_fns)]

    def rollout(self, plan) -> TokenRollout:
        rows = plan.local_rows()
        if any("prompt" not in r for r in rows):
            raise ValueError("every row needs a 'prompt' (text or chat messages)")
        keys = [(self.cfg.seed, Stream.TOKENS, plan.iteration, int(i)) for i in plan.indices]
        return self.policy.rollout([r["prompt"] for r in rows], keys=keys)

    def score(self, rollout: TokenRollout, plan) -> Tensor:
        """Rewards [b, K] (float64, NaN = unscorable) from every reward function."""
        rows = plan.local_rows()
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise ValueError("all dataset rows must have the same columns")
        clash = _RESERVED_COLUMNS & keys
        if clash:
            raise ValueError(f"dataset columns {sorted(clash)} clash with reward-function arguments")
        columns = {k: [r[k] for r in rows] for k in keys if k != "prompt"}
        prompts = [r["prompt"] for r in rows]
        chat = isinstance(prompts[0], list)
        completions = ([[{"role": "assistant", "content": c}] for c in rollout.completions]
                       if chat else list(rollout.completions))
        ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask)]
        cols = []
        for fn, name in zip(self.reward_fns, self.reward_names):
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
            cols.append(_floats(list(values), len(prompts), name))
        return torch.tensor(cols, dtype=torch.float64).T

    def advantages(self, rollout: TokenRollout, rewards: Tensor, plan, trainer: Trainer) -> AdvantageResult:
        opts = {}
        if self.cfg.advantage == "stratified":
            if "strata" not in plan.rows[0]:
                raise ValueError("advantage='stratified' needs a 'strata' column in the dataset")
            opts["strata"] = _dense_ids([r["strata"] for r in plan.rows])
        return trainer.estimate(plan, rewards, reward_weights=self.cfg.reward_weights,
                                prompt_keys=[json.dumps(r["prompt"], sort_keys=True) for r in plan.rows], **opts)

    def update_batch(self, rollout: TokenRollout, adv: AdvantageResult) -> UpdateBatch:
        return UpdateBatch(rollout, rollout.completion_mask, adv.advantages, adv.valid, rollout.sample_logp,
                           max_len=self.cfg.max_new_tokens, recompute_old=True)

    def end_iteration(self) -> None:
        """Text policies carry no state across iterations besides the trainer's."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def metrics(self, rollout: TokenRollout, rewards: Tensor, plan) -> dict[str, float]:
        """Per reward function means, completion lengths and the stopped fraction, over all processes."""
        per_row = torch.cat([rewards, rollout.completion_mask.sum(1, keepdim=True).double().cpu(),
                             rollout.stopped.double().cpu()[:, None]], dim=1)
        everyone = plan.gather(per_row)
        out = {f"reward/{name}": float(everyone[:, k].nanmean()) for k, name in enumerate(self.reward_names)}
        return out | {"completion_len": float(everyone[:, -2].mean()), "frac_stopped": float(everyone[:, -1].mean())}


class GRPO:
    """GRPO trainer for a causal LM (a model object, or a local directory to load one from).

    Keyword arguments are ``GRPOConfig`` fields, by flowgrpo's names or TRL's (or pass ``config=``). With beta > 0
    the reference is the LoRA-disabled model for peft models, else ``ref_model`` or a frozen copy. The model is put
    in eval mode (no dropout) so recomputed log-probs are deterministic.
    """

    def __init__(
        self, model, tokenizer=None, reward_fns: RewardFn | Sequence[RewardFn] = (), *,
        config: GRPOConfig | None = None, ref_model=None, optimizer: torch.optim.Optimizer | None = None,
        **overrides,
    ) -> None:
        cfg = GRPOConfig.from_kwargs(config, **overrides) if overrides else (config or GRPOConfig())
        if isinstance(model, (str, Path)):
            model, loaded = load_causal_lm(model)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("a tokenizer is needed with a model object")
        reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        if not reward_fns or not all(callable(f) for f in reward_fns):
            raise ValueError("reward_fns must be one or more callables fn(prompts, completions, **columns)")
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(reward_fns):
            raise ValueError(f"reward_weights has {len(cfg.reward_weights)} entries for "
                             f"{len(reward_fns)} reward functions")
        dist = Dist.create()
        model.to(dist.device).eval()
        policy = LLMPolicy(model, tokenizer, cfg.sampling, ref_model=ref_model)
        if cfg.beta > 0 and ref_model is None and not policy.is_peft:
            policy.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.config = cfg
        self.trainer = Trainer(TextTask(policy, cfg, reward_fns), cfg, dist, config_json=settings_json(cfg),
                               optimizer=optimizer)
        self._resumed = False

    @property
    def policy(self) -> LLMPolicy:
        return self.trainer.task.policy

    @property
    def tracker(self):
        return self.trainer.state.tracker

    @property
    def step_count(self) -> int:
        return self.trainer.state.iteration

    @property
    def history(self) -> list[dict]:
        return self.trainer.state.history["train"]

    def step(self, batch: Sequence[Mapping]) -> dict[str, float]:
        """Sample G completions for each of the ``prompts_per_iter`` rows of ``batch`` (the same rows on every
        process), score them and make the update. Returns the metrics."""
        return self.trainer.step(list(batch))

    def _epoch_order(self, n: int, epoch: int) -> list[int]:
        return torch.randperm(n, generator=keyed_generator(self.config.seed, Stream.PROMPTS, epoch)).tolist()

    def train(self, dataset, *, num_steps: int | None = None, epochs: int = 1,
              progress: bool = True) -> list[dict[str, float]]:
        """Train on ``dataset`` (list of dicts or ``datasets.Dataset``) until ``num_steps`` steps in total
        (counting steps before a resume) or ``epochs`` passes; shuffled per epoch from the seed, the last partial
        batch dropped. With an ``out`` directory the first call resumes from its newest complete checkpoint, and
        checkpoints are written every ``save_every`` steps and at the end. Returns the metrics of the steps run."""
        cfg = self.config
        per_epoch = len(dataset) // cfg.prompts_per_iter
        if per_epoch == 0:
            raise ValueError(f"dataset has {len(dataset)} rows, fewer than prompts_per_iter={cfg.prompts_per_iter}")
        if cfg.out and not self._resumed:
            self.trainer.resume()
            self._resumed = True

        def draw(iteration: int) -> list:
            epoch, batch = divmod(iteration, per_epoch)
            order = self._epoch_order(len(dataset), epoch)[batch * cfg.prompts_per_iter:(batch + 1) * cfg.prompts_per_iter]
            return [dataset[i] for i in order]

        total = num_steps if num_steps is not None else epochs * per_epoch
        out = self.trainer.fit(draw, iterations=total, progress=progress)
        if cfg.out and out:
            self.trainer.save()
        return out

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write a complete checkpoint directory at ``path`` (weights, optimizer, tracker, step)."""
        self.trainer.save(path)
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume exactly from ``save_checkpoint`` output (same base model and data)."""
        self.trainer.load(path)
        self._resumed = True

    def save_model(self, path: str | Path) -> None:
        """Export the model (or LoRA adapter) and tokenizer with ``save_pretrained`` (process 0)."""
        if self.trainer.dist.is_main:
            self.policy.model.save_pretrained(path)
            self.policy.tokenizer.save_pretrained(path)
