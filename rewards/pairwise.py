"""Pairwise preferences from pointwise rewards, and the G×G preference matrix Pref-GRPO needs per group."""
from __future__ import annotations

from typing import Any

import torch

from flowgrpo.rewards.base import PairwiseJudge, RewardFn, build_reward, check_images


def bradley_terry(r_a: torch.Tensor, r_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(a ≻ b) = σ((r_a − r_b) / T); pairs with a NaN reward get 0.5 (no preference)."""
    p = torch.sigmoid((r_a - r_b) / temperature)
    return torch.where(p.isnan(), torch.full_like(p, 0.5), p)


class PointwiseAsPairwise(PairwiseJudge):
    """Turns a pointwise reward into a judge via Bradley–Terry with temperature ``T``.

    Small T approaches a hard comparison (ties stay 0.5); pairs where either reward is NaN count as 0.5 and
    are counted in ``stats["nan_pairs"]``. ``metadata`` (one dict for the shared prompt) is passed to the reward.
    """

    def __init__(self, reward: RewardFn, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.reward, self.temperature = reward, float(temperature)
        self.name = f"bt({reward.name})"

    @classmethod
    def from_config(cls, reward: str, reward_config: dict[str, Any] | None = None,
                    temperature: float = 1.0) -> "PointwiseAsPairwise":
        return cls(build_reward(reward, **dict(reward_config or {})), temperature)

    def _rewards(self, prompt: str, images: torch.Tensor, metadata: dict) -> torch.Tensor:
        n = images.shape[0]
        return self.reward(images, [prompt] * n, [dict(metadata) for _ in range(n)]).float()

    def compare(self, prompt: str, images_a: torch.Tensor, images_b: torch.Tensor, metadata: dict) -> torch.Tensor:
        r = self._rewards(prompt, torch.cat([images_a, images_b]), metadata)
        r_a, r_b = r.split(images_a.shape[0])
        self.count("nan_pairs", int((r_a.isnan() | r_b.isnan()).sum()))
        return bradley_terry(r_a, r_b, self.temperature)

    def matrix(self, prompt: str, images: torch.Tensor, metadata: dict) -> torch.Tensor:
        """All G×G preferences from G reward evaluations (instead of G(G−1) pair evaluations)."""
        r = self._rewards(prompt, images, metadata)
        s = bradley_terry(r[:, None], r[None, :], self.temperature)
        g = len(r)
        off = ~torch.eye(g, dtype=torch.bool)
        self.count("pairs", g * (g - 1) // 2)
        self.count("nan_pairs", int((r[:, None].isnan() | r[None, :].isnan())[off].sum()) // 2)
        return s.fill_diagonal_(0.5)


def preference_matrix(judge: PairwiseJudge, prompt: str, images: torch.Tensor,
                      metadata: dict | None = None) -> torch.Tensor:
    """s[G,G] with s[i,j] = P(image i ≻ image j), s[j,i] = 1 − s[i,j], diagonal 0.5.

    Judges with a ``matrix`` method (pointwise-derived ones) score each image once; others are asked each
    of the G(G−1)/2 unordered pairs once, in a single batched ``prefer`` call.
    """
    check_images(images)
    g = images.shape[0]
    if g < 2:
        raise ValueError(f"a preference matrix needs at least 2 images, got {g}")
    if hasattr(judge, "matrix"):
        return judge.matrix(prompt, images, dict(metadata or {}))
    i, j = torch.triu_indices(g, g, offset=1)
    p = judge.prefer(prompt, images[i], images[j], metadata)
    s = torch.full((g, g), 0.5)
    s[i, j] = p
    s[j, i] = 1 - p
    return s
