"""GenEval's rule-based check as a reward: a COCO detector and CLIP from local paths score each image against its
GenEval metadata entry (`flowgrpo.rewards.geneval_detector.GenevalScorer`).

`partial`: the fraction of the entry's requirements met (objects present, counts, colours, positions, exclusions);
`strict`: 1 if the image passes GenEval, else 0. An image whose metadata the rules cannot check (no `include`,
a class outside the 80 COCO classes, an unknown colour or relation, ...) gets NaN and is counted in
`stats["unscorable"]`, never 0.

Real use: ``{"detector_path": "/models/mask2former-swin-small-coco-instance",
"clip_path": "/models/clip-vit-large-patch14", "device": "cuda"}``.
"""
from __future__ import annotations

import math

import torch

from flowgrpo.media import to_uint8
from flowgrpo.rewards.base import Reward
from flowgrpo.rewards.geneval_detector import DETECTOR_SIZE, GenevalScorer
from flowgrpo.rewards.geneval_rules import unscorable_reason

MODES = ("partial", "strict")


class GenevalReward(Reward):
    """GenEval's verdict per image: fraction of requirements met (`partial`) or pass/fail (`strict`)."""

    name = "geneval"

    def __init__(self, detector_path: str, clip_path: str, mode: str = "partial", device: str = "cpu",
                 dtype: str = "float32", detector_size: int = DETECTOR_SIZE, batch_size: int = 16) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"GenevalReward mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.scorer = GenevalScorer(detector_path, clip_path, device=device, dtype=dtype, detector_size=detector_size,
                                    batch_size=batch_size)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        out = [math.nan] * len(metadata)
        todo = [i for i, meta in enumerate(metadata) if unscorable_reason(meta) is None]
        self.count("unscorable", len(metadata) - len(todo))
        if todo:
            arrays = to_uint8(images)
            verdicts = self.scorer.score_batch([arrays[i] for i in todo], [metadata[i] for i in todo])
            for i, v in zip(todo, verdicts):
                out[i] = v.score if self.mode == "partial" else float(v.passed)
        return torch.tensor(out)
