"""PickScore-style reward: a transformers CLIP model fine-tuned on human preferences, from local directories.

reward = logit_scale.exp() · cos(image_emb, text_emb) · scale. With the released PickScore_v1 weights
(logit_scale ≈ 100) raw scores sit around 18–24; Flow-GRPO divides by 26, i.e. ``scale = 1/26``.

Real use: ``{"model_path": "/models/PickScore_v1", "processor_path": "/models/CLIP-ViT-H-14-laion2B-s32B-b79K"}``
(snapshots of yuvalkirstain/PickScore_v1 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K downloaded beforehand).
HPS-style checkpoints in transformers CLIP format load the same way.
"""
from __future__ import annotations

import torch

from flowgrpo.rewards.base import Reward
from flowgrpo.rewards.hf_clip import LocalClip


class PickScore(Reward):
    """logit_scale · cosine similarity of a local transformers CLIPModel (times ``scale``)."""

    def __init__(self, model_path: str, processor_path: str | None = None, scale: float = 1.0,
                 device: str = "cpu", dtype: str = "float32", name: str = "pickscore") -> None:
        super().__init__()
        self.clip = LocalClip(model_path, processor_path, device=device, dtype=dtype)
        self.scale, self.name = float(scale), name

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return self.scale * self.clip.model.logit_scale.exp().float() * cos
