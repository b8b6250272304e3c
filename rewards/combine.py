"""Several rewards at once: a weighted sum (one pointwise reward) or the [B,K] stack for GDPO.

Component specs (config files, ``build_reward("weighted", components=[...])``)::

    {"name": "clipscore", "weight": 0.5, "label": "clip", "config": {"arch": "ViT-B-32", "checkpoint": "/m/clip.pt"}}

``label`` (optional) names the column / term; it defaults to the built reward's ``name``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from flowgrpo.rewards.base import Reward, RewardFn, build_reward

_SPEC_KEYS = {"name", "weight", "label", "config"}


def build_components(components: Sequence[dict[str, Any]]) -> tuple[list[RewardFn], list[float], list[str]]:
    """Build the rewards of a component list; returns (rewards, weights, labels)."""
    if not components:
        raise ValueError("components must list at least one reward spec like {'name': 'ocr', 'weight': 1.0}")
    rewards, weights, labels = [], [], []
    for i, spec in enumerate(components):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"components[{i}] must be a dict with a 'name' key, got {spec!r}")
        extra = sorted(set(spec) - _SPEC_KEYS)
        if extra:
            raise ValueError(f"components[{i}] has unknown key(s) {extra}; allowed: {sorted(_SPEC_KEYS)}")
        reward = build_reward(spec["name"], **dict(spec.get("config") or {}))
        rewards.append(reward)
        weights.append(float(spec.get("weight", 1.0)))
        labels.append(str(spec.get("label", reward.name)))
    return rewards, weights, labels


def _check_parts(rewards: Sequence[RewardFn], weights: Sequence[float], labels: Sequence[str]) -> None:
    if not rewards:
        raise ValueError("need at least one reward")
    if len(weights) != len(rewards) or len(labels) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights and {len(labels)} labels")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"reward labels must be unique, got {list(labels)}; give components a 'label'")


class MultiReward:
    """Runs K rewards on one batch and returns their [B,K] stack (NaNs kept per entry).

    The trainer feeds the matrix to the core's ``gdpo`` advantage (each column normalised within its group,
    then combined with ``weights``); ``names`` label the columns for logging.
    """

    def __init__(self, rewards: Sequence[RewardFn], weights: Sequence[float] | None = None,
                 labels: Sequence[str] | None = None) -> None:
        self.rewards = list(rewards)
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        self.names = [r.name for r in self.rewards] if labels is None else list(labels)
        _check_parts(self.rewards, self.weights, self.names)

    @classmethod
    def from_config(cls, components: Sequence[dict[str, Any]]) -> "MultiReward":
        rewards, weights, labels = build_components(components)
        return cls(rewards, weights, labels)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        cols = [r(images, prompts, metadata).to(torch.float32).reshape(-1) for r in self.rewards]
        return torch.stack(cols, dim=1)


class WeightedSum(Reward):
    """``sum_k w_k r_k`` per sample; a NaN in any term makes that sample NaN (it could not be fully scored)."""

    def __init__(self, rewards: Sequence[RewardFn], weights: Sequence[float],
                 labels: Sequence[str] | None = None) -> None:
        super().__init__()
        self.multi = MultiReward(rewards, weights, labels)
        terms = "+".join(f"{w:g}*{n}" for w, n in zip(self.multi.weights, self.multi.names))
        self.name = f"weighted({terms})"

    @classmethod
    def from_config(cls, components: Sequence[dict[str, Any]]) -> "WeightedSum":
        rewards, weights, labels = build_components(components)
        return cls(rewards, weights, labels)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        stack = self.multi(images, prompts, metadata)
        # NaN * w is NaN for every w (0 included), so an unscored term leaves the whole sample NaN.
        return (stack * torch.tensor(self.multi.weights, dtype=torch.float32)).sum(dim=1)
