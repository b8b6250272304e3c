"""Text policies scored by TRL-style reward functions: during training (`score_completions`) and on held-out
prompts (`TextEvaluator`: the mean of each reward function and, given what counts as correct, pass@k).

Evaluation completions are greedy (one per prompt) or sampled (n per prompt, keyed by (seed, EVAL, prompt, sample),
so any number of processes makes the same ones). pass@k is the unbiased estimator of Chen et al. (2021) from n >= k
samples per prompt: 1 - C(n - c, k) / C(n, k) with c correct, averaged over prompts.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowgrpo.samplers.noise import Stream

RewardFn = Callable[..., Sequence[float | None]]
RESERVED_COLUMNS = {"prompts", "completions", "completion_ids"}


def reward_names(reward_fns: Sequence[RewardFn]) -> list[str]:
    return [getattr(fn, "__name__", str(k)) for k, fn in enumerate(reward_fns)]


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


def score_completions(reward_fns: Sequence[RewardFn], rows: list[dict], rollout) -> Tensor:
    """Rewards [b, K] (float64, NaN = unscorable) of the rollout's completions of ``rows`` from every reward
    function, called with TRL's signature: every dataset column other than ``prompt`` passed by name."""
    keys = set(rows[0])
    if any(set(r) != keys for r in rows):
        raise ValueError("all dataset rows must have the same columns")
    clash = RESERVED_COLUMNS & keys
    if clash:
        raise ValueError(f"dataset columns {sorted(clash)} clash with reward-function arguments")
    columns = {k: [r[k] for r in rows] for k in keys if k != "prompt"}
    prompts = [r["prompt"] for r in rows]
    chat = isinstance(prompts[0], list)
    completions = ([[{"role": "assistant", "content": c}] for c in rollout.completions]
                   if chat else list(rollout.completions))
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask)]
    cols = []
    for fn, name in zip(reward_fns, reward_names(reward_fns)):
        values = fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
        cols.append(_floats(list(values), len(prompts), name))
    return torch.tensor(cols, dtype=torch.float64).T


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k completions drawn without replacement from n, c of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class TextEvalResult:
    prompts: list  # one per evaluated row
    completions: list[list[str]]  # [prompt][sample]
    rewards: np.ndarray  # [prompt, sample, K] (NaN = unscorable)
    names: list[str]
    weights: tuple | None  # combine the K rewards (None: their sum)
    k: int
    correct_at: float | None  # a completion whose combined reward is >= this counts as correct (pass@k)

    @property
    def combined(self) -> np.ndarray:
        """[prompt, sample] the weighted sum of the reward functions."""
        w = np.asarray(self.weights if self.weights is not None else [1.0] * len(self.names))
        return (self.rewards * w).sum(axis=-1)

    def pass_at_k(self) -> float | None:
        if self.correct_at is None:
            return None
        r = self.combined
        return float(np.mean([pass_at_k(r.shape[1], int((row >= self.correct_at).sum()), self.k) for row in r]))

    def summary(self) -> dict:
        r = self.combined
        ok = r[~np.isnan(r)]
        out = {"reward": float(ok.mean()) if ok.size else math.nan,
               "reward_stderr": float(ok.std() / math.sqrt(ok.size)) if ok.size else math.nan,
               "reward_by_fn": {n: float(np.nanmean(self.rewards[..., j])) for j, n in enumerate(self.names)},
               "n_prompts": len(self.prompts), "samples_per_prompt": int(r.shape[1]), "n_nan": int(np.isnan(r).sum())}
        passed = self.pass_at_k()
        return out | ({f"pass@{self.k}": passed} if passed is not None else {})

    def metrics(self) -> dict[str, float]:
        s = self.summary()
        out = {"eval/reward": s["reward"]} | {f"eval/reward/{n}": v for n, v in s["reward_by_fn"].items()}
        return out | ({f"eval/pass@{self.k}": s[f"pass@{self.k}"]} if f"pass@{self.k}" in s else {})

    def line(self) -> str:
        s = self.summary()
        passed = f", pass@{self.k} {100 * s[f'pass@{self.k}']:.1f}%" if f"pass@{self.k}" in s else ""
        return f"eval reward {s['reward']:.4f} ± {s['reward_stderr']:.4f}{passed}"

    def write(self, out: str | Path, name: str = "model") -> Path:
        """results.json and completions.jsonl (each prompt with its completions and their rewards)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.summary(), indent=1))
        with open(out / "completions.jsonl", "w") as f:
            for prompt, texts, rewards in zip(self.prompts, self.completions, self.combined.tolist()):
                f.write(json.dumps({"prompt": prompt, "completions": texts, "rewards": rewards}) + "\n")
        return out

    def grid_image(self):
        return None  # text has no grid


@dataclass
class TextEvaluator:
    """Held-out ``rows`` (each with a "prompt" and the columns the reward functions read) scored by
    ``reward_fns``: ``samples`` completions per prompt (greedy: one, the most probable), pass@``k`` when
    ``correct_at`` says which combined reward counts as correct."""

    rows: list[dict]
    reward_fns: list[RewardFn]
    weights: tuple | None = None
    samples: int = 1
    k: int = 1
    greedy: bool = True
    correct_at: float | None = None
    seed: int = 0
    batch: int = 8  # prompts per forward pass on one process
    names: list[str] = field(init=False)
    name = "eval reward"

    def __post_init__(self) -> None:
        if not self.rows or any("prompt" not in r for r in self.rows):
            raise ValueError("evaluation needs at least one row, each with a 'prompt'")
        if not self.reward_fns:
            raise ValueError("evaluation needs at least one reward function")
        if self.samples < 1 or not 1 <= self.k <= self.samples:
            raise ValueError(f"need samples >= 1 and 1 <= k <= samples, got samples={self.samples}, k={self.k}")
        if self.greedy and self.samples > 1:
            raise ValueError(f"greedy decoding gives one completion per prompt; samples={self.samples} needs "
                             "greedy=False")
        self.names = reward_names(self.reward_fns)

    def run(self, policy, dist) -> TextEvalResult:
        """Process r evaluates prompts r, r + w, ... of the list padded to a multiple of w x batch, so every process
        makes the same number of forward passes (a sharded model's forwards are collectives)."""
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        n = len(self.rows)
        total = -(-n // (world * self.batch)) * world * self.batch
        mine = [i for i in range(rank, total, world)]
        done: list[tuple[int, list[str], list[list[float]]]] = []
        for start in range(0, len(mine), self.batch):
            idx = mine[start:start + self.batch]
            rows = [self.rows[min(i, n - 1)] for i in idx for _ in range(self.samples)]
            keys = [(self.seed, Stream.EVAL, i, j) for i in idx for j in range(self.samples)]
            ro = policy.rollout([r["prompt"] for r in rows], keys=keys, greedy=self.greedy)
            rewards = score_completions(self.reward_fns, rows, ro).view(len(idx), self.samples, -1)
            done += [(i, ro.completions[a * self.samples:(a + 1) * self.samples], rewards[a].tolist())
                     for a, i in enumerate(idx) if i < n]
        if dist is not None:
            done = dist.gather_objects(done)
        done.sort(key=lambda t: t[0])
        return TextEvalResult([self.rows[i]["prompt"] for i, _, _ in done], [c for _, c, _ in done],
                              np.array([r for _, _, r in done], dtype=np.float64), self.names, self.weights, self.k,
                              self.correct_at)

    def table(self, records: dict[str, dict], brief: bool = False) -> str:
        """The mean reward with its standard error, pass@k when measured, and each reward function's mean."""
        first = next(iter(records.values()))
        passed = [k for k in first if k.startswith("pass@")]
        fns = list(first["reward_by_fn"])
        rows = [["model", "eval reward", *passed, *fns], ["---"] * (2 + len(passed) + len(fns))]
        rows += [[name, f"{rec['reward']:.4f} ± {rec['reward_stderr']:.4f}",
                  *(f"{100 * rec[p]:.1f}%" for p in passed), *(f"{rec['reward_by_fn'][f]:.4f}" for f in fns)]
                 for name, rec in records.items()]
        return "".join("| " + " | ".join(row) + " |\n" for row in rows)

    def change(self, base: dict, last: dict) -> str:
        return f"eval reward {base['reward']:.4f} -> {last['reward']:.4f}"

    def score(self, record: dict) -> tuple[float, float]:
        return record["reward"], record["reward_stderr"]
