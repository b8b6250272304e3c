"""GRPO for text LLMs from Python, on the same trainer and algorithm core that train images.

    from flowgrpo.llm import GRPO
    trainer = GRPO(model, tokenizer, reward_fns=[my_reward], advantage="grpo",
                   loss_agg="seq-mean-token-mean", group_size=8, beta=0.0)   # TRL's names work too
    trainer.train(dataset, eval_dataset=held_out, eval_every=50)  # lists of dicts or datasets.Dataset
    metrics = trainer.iterate(batch)  # or drive it yourself, one batch of prompts per iteration
    result = trainer.evaluate(held_out, samples=8, k=4, correct_at=1.0)   # mean reward and pass@4

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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.distributed import Dist
from flowgrpo.llm_config import GRPOConfig
from flowgrpo.llm_eval import RewardFn, TextEvalResult, TextEvaluator, reward_names, score_completions
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.policies.llm import LLMPolicy, TokenRollout, load_causal_lm
from flowgrpo.samplers.noise import Stream, keyed_generator
from flowgrpo.trainer import Trainer, settings_json

__all__ = ["GRPO", "GRPOConfig", "TextEvalResult", "TextEvaluator", "TextTask"]


def _renamed(old: str, new: str) -> None:
    warnings.warn(f"GRPO.{old} is now GRPO.{new} (one name per concept: an iteration, as in flowgrpo train); the old "
                  "name works for one more release", FutureWarning, stacklevel=3)



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
        self.reward_names = reward_names(reward_fns)

    def rollout(self, plan) -> TokenRollout:
        rows = plan.local_rows()
        if any("prompt" not in r for r in rows):
            raise ValueError("every row needs a 'prompt' (text or chat messages)")
        keys = [(self.cfg.seed, Stream.TOKENS, plan.iteration, int(i)) for i in plan.indices]
        return self.policy.rollout([r["prompt"] for r in rows], keys=keys)

    def score(self, rollout: TokenRollout, plan) -> Tensor:
        """Rewards [b, K] (float64, NaN = unscorable) from every reward function."""
        return score_completions(self.reward_fns, plan.local_rows(), rollout)

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

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        if tensors:
            raise ValueError(f"{where}: the checkpoint carries strategy tensors ({sorted(tensors)[:3]}...) that a text "
                             "policy's run does not have")

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
    def iteration(self) -> int:
        """Iterations trained so far (counting those before a resume)."""
        return self.trainer.state.iteration

    @property
    def step_count(self) -> int:
        _renamed("step_count", "iteration")
        return self.iteration

    @property
    def history(self) -> list[dict]:
        return self.trainer.state.history["train"]

    def iterate(self, batch: Sequence[Mapping]) -> dict[str, float]:
        """One iteration: sample G completions for each of the ``prompts_per_iter`` rows of ``batch`` (the same rows
        on every process), score them and make the update. Returns the metrics."""
        return self.trainer.step(list(batch))

    def step(self, batch: Sequence[Mapping]) -> dict[str, float]:
        _renamed("step()", "iterate()")
        return self.iterate(batch)

    def evaluator(self, dataset, reward_fns: RewardFn | Sequence[RewardFn] | None = None, *, samples: int = 1,
                  k: int | None = None, greedy: bool | None = None, correct_at: float | None = None,
                  batch: int = 8) -> TextEvaluator:
        """How `evaluate` scores ``dataset`` (see there)."""
        fns = self.trainer.task.reward_fns if reward_fns is None else (
            [reward_fns] if callable(reward_fns) else list(reward_fns))
        weights = self.config.reward_weights if reward_fns is None else None
        return TextEvaluator(list(dataset), fns, weights, samples, k or samples, samples == 1 if greedy is None
                             else greedy, correct_at, self.config.seed, batch)

    def evaluate(self, dataset, reward_fns: RewardFn | Sequence[RewardFn] | None = None, *, samples: int = 1,
                 k: int | None = None, greedy: bool | None = None, correct_at: float | None = None,
                 batch: int = 8) -> TextEvalResult:
        """Score the policy on held-out ``dataset`` rows with ``reward_fns`` (default: the training ones, combined by
        reward_weights): ``samples`` completions per prompt, greedy when there is one (unless ``greedy=False``),
        sampled at the training temperature otherwise; with ``correct_at``, pass@``k`` (k = samples by default) of
        the completions whose reward reaches it. Split over the processes; any number gives the same result."""
        return self.evaluator(dataset, reward_fns, samples=samples, k=k, greedy=greedy, correct_at=correct_at,
                              batch=batch).run(self.policy, self.trainer.dist)

    def _epoch_order(self, n: int, epoch: int) -> list[int]:
        return torch.randperm(n, generator=keyed_generator(self.config.seed, Stream.PROMPTS, epoch)).tolist()

    def train(self, dataset, *, iterations: int | None = None, epochs: int = 1, progress: bool = True,
              eval_dataset=None, eval_every: int = 0, eval_options: dict | None = None,
              num_steps: int | None = None) -> list[dict[str, float]]:
        """Train on ``dataset`` (list of dicts or ``datasets.Dataset``) until ``iterations`` in total (counting those
        before a resume) or ``epochs`` passes; shuffled per epoch from the seed, the last partial batch dropped. With an
        ``out`` directory the first call resumes from its newest complete checkpoint, and checkpoints are written
        every ``save_every`` iterations and at the end. With ``eval_dataset``: `evaluate` (with ``eval_options``)
        before training, every ``eval_every`` iterations (0 = only then and at the end) and at the end, into
        ``history_eval`` (and ``out/eval/iterNNNNN/``). Returns the metrics of the iterations run."""
        if num_steps is not None:
            _renamed("train(num_steps=...)", "train(iterations=...)")
            iterations = num_steps if iterations is None else iterations
        cfg = self.config
        per_epoch = len(dataset) // cfg.prompts_per_iter
        if per_epoch == 0:
            raise ValueError(f"dataset has {len(dataset)} rows, fewer than prompts_per_iter={cfg.prompts_per_iter}")
        if cfg.out and not self._resumed:
            self.trainer.resume()
            self._resumed = True
        evaluator = self.evaluator(eval_dataset, **(eval_options or {})) if eval_dataset is not None else None

        def draw(iteration: int) -> list:
            epoch, batch = divmod(iteration, per_epoch)
            order = self._epoch_order(len(dataset), epoch)[batch * cfg.prompts_per_iter:(batch + 1) * cfg.prompts_per_iter]
            return [dataset[i] for i in order]

        def after(metrics: dict) -> None:
            if evaluator is not None and eval_every and self.iteration % eval_every == 0:
                self._evaluate_into_history(evaluator)

        if evaluator is not None and not self.history_eval:
            self._evaluate_into_history(evaluator)
        total = iterations if iterations is not None else epochs * per_epoch
        out = self.trainer.fit(draw, iterations=total, progress=progress, after_step=after)
        if evaluator is not None and self.history_eval[-1]["iteration"] != self.iteration:
            self._evaluate_into_history(evaluator)
        if cfg.out and out:
            self.trainer.save()
        return out

    @property
    def history_eval(self) -> list[dict]:
        """The evaluations of `train` so far: their iteration and `TextEvalResult.summary()`."""
        return self.trainer.state.history["eval"]

    def _evaluate_into_history(self, evaluator: TextEvaluator) -> TextEvalResult:
        result = evaluator.run(self.policy, self.trainer.dist)
        self.history_eval.append({"iteration": self.iteration, **result.summary()})
        self.trainer.log(result.metrics(), self.iteration)
        if self.config.out and self.trainer.dist.is_main:
            result.write(Path(self.config.out) / "eval" / f"iter{self.iteration:05d}")
        return result

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
