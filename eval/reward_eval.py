"""Evaluation by a reward model, for prompt sets without GenEval metadata (e.g. a .txt file of prompts).

Deterministic ODE samples per prompt (fixed seed, as GenEval evaluation does), scored with the reward
the run trains on: mean with its standard error, `results.json` and a grid captioned with the scores.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowgrpo.eval.grid import image_grid
from flowgrpo.eval.sampling import sharded_samples
from flowgrpo.media import to_uint8
from flowgrpo.prompts.loaders import ordered_tags


@dataclass
class RewardEvalResult:
    rewards: list[float]  # one per image; NaN where the reward failed
    images: list[np.ndarray]  # the first images (for the grid)
    entries: list[dict]

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.rewards))

    @property
    def stderr(self) -> float:
        ok = np.asarray(self.rewards)[~np.isnan(self.rewards)]
        return float(ok.std() / math.sqrt(len(ok))) if len(ok) else float("nan")

    def by_tag(self) -> dict[str, float]:
        """Mean reward per tag, when the prompts carry tags (categories of the user's own)."""
        r = np.asarray(self.rewards)
        return {t: float(np.nanmean(r[[e.get("tag") == t for e in self.entries]])) for t in ordered_tags(self.entries)}

    def summary(self) -> dict:
        out = {"reward": self.mean, "reward_stderr": self.stderr, "n_images": len(self.rewards),
               "n_nan": int(np.isnan(self.rewards).sum())}
        return out | ({"reward_by_tag": self.by_tag()} if self.by_tag() else {})

    def metrics(self) -> dict[str, float]:
        return {"eval/reward": self.mean} | {f"eval/reward/{t}": v for t, v in self.by_tag().items()}

    def line(self) -> str:
        return f"eval reward {self.mean:.4f} ± {self.stderr:.4f}"

    def grid_image(self, ncols: int = 8):
        """The first images, each with its prompt and reward; None if none."""
        if not self.images:
            return None
        n = len(self.images)
        captions = [f"{r:.3f} {e['prompt']}" for r, e in zip(self.rewards[:n], self.entries[:n])]
        return image_grid(self.images, min(ncols, n), captions=captions)

    def write(self, out: str | Path, name: str = "model") -> Path:
        """results.json and grid.png."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.summary(), indent=1))
        grid = self.grid_image()
        if grid is not None:
            grid.save(out / "grid.png")
        return out


def is_geneval(entries: list[dict]) -> bool:
    """True when every entry carries GenEval requirements (`include`), so the verifier can score it."""
    return all("include" in e for e in entries)


@torch.no_grad()
def evaluate_reward(policy, entries: list[dict], reward_fn, *, images_per_prompt: int, num_steps: int,
                    guidance: float, seed: int = 0, batch: int = 64, progress: bool = True, dist=None,
                    grid_size: int = 24) -> RewardEvalResult:
    """Generate `images_per_prompt` ODE samples per entry and score them with `reward_fn`; noise and the split
    over processes as in `flowgrpo.eval.geneval.evaluate` (any number of processes gives the same result)."""
    if not entries:
        raise ValueError("evaluate_reward needs at least one prompt")
    todo = [e for e in entries for _ in range(images_per_prompt)]
    scored: list[tuple[int, float, np.ndarray | None]] = []
    for rows, chunk, x in sharded_samples(policy, todo, images_per_prompt=images_per_prompt, num_steps=num_steps,
                                     guidance=guidance, seed=seed, batch=batch, progress=progress, dist=dist):
        images = to_uint8(x)
        rewards = reward_fn(x, [e["prompt"] for e in chunk], chunk).tolist()
        scored += [(i, float(r), images[i - rows.start] if i < grid_size else None)
                   for i, r in zip(range(rows.start, rows.stop), rewards)]
    if dist is not None:
        scored = dist.gather_objects(scored)
    scored.sort(key=lambda t: t[0])
    return RewardEvalResult([r for _, r, _ in scored], [img for _, _, img in scored if img is not None], todo)
