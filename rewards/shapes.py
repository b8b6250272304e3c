"""The Shapes verifier as a reward: GenEval-style exact checks on the embedded Shapes world."""
from __future__ import annotations

import numpy as np
import torch

from flowgrpo.rewards.base import Reward
from flowgrpo.shapes.verify import verify


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] floats in [0, 1] -> uint8 [H, W, 3] arrays."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


class ShapesReward(Reward):
    """`partial`: fraction of the entry's requirements met (dense); `strict`: 1 if all are met (GenEval accuracy)."""

    name = "shapes"

    def __init__(self, mode: str = "partial") -> None:
        super().__init__()
        if mode not in ("partial", "strict"):
            raise ValueError(f"ShapesReward mode must be 'partial' or 'strict', got {mode!r}")
        self.mode = mode

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        out = []
        for img, meta in zip(to_uint8(images), metadata):
            if "include" not in meta:
                raise ValueError(f"the shapes reward needs GenEval metadata ('include') for prompt {meta.get('prompt')!r}")
            v = verify(img, meta)
            out.append(v.score if self.mode == "partial" else float(v.passed))
        return torch.tensor(out)


def shapes_judge(temperature: float = 0.1, mode: str = "partial"):
    """Pairwise Shapes comparator for Pref-GRPO: Bradley-Terry over the verifier's score."""
    from flowgrpo.rewards.pairwise import PointwiseAsPairwise

    return PointwiseAsPairwise(ShapesReward(mode), temperature)
