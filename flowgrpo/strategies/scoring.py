"""How image strategies score their samples and form advantages: a pointwise reward, or Pref-GRPO's pairwise win
rates within each group (optionally mixed with the pointwise advantages).

A group's members may live on different processes, so the images are gathered (as 8-bit pixels: what any judge
looks at) and each process judges the groups g with g % world_size == rank; the win rates are then summed over
processes, so every process holds all of them and the pairwise judge runs once per pair in the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowgrpo.core import AdvantageResult, compute_advantages, winrate_from_preferences
from flowgrpo.media import to_pixels
from flowgrpo.rewards import PairwiseJudge, preference_matrix


def group_winrates(judge: PairwiseJudge, images: torch.Tensor, plan) -> torch.Tensor:
    """Each global sample's mean win probability against the other members of its group (all G(G-1)/2 pairs),
    [B] on every process; ``images`` are the global batch's uint8 pixels [B, 3, H, W]."""
    dist = plan.dist
    wins = torch.zeros(len(plan.rows), dtype=torch.float64)
    for g in plan.group_ids.unique().tolist():
        if g % dist.world_size != dist.rank:
            continue
        rows = torch.nonzero(plan.group_ids == g).flatten()
        first = int(rows[0])
        s = preference_matrix(judge, plan.rows[first]["prompt"], images[rows].float() / 255, plan.rows[first])
        wins[rows] = winrate_from_preferences(s).double()
    return dist.all_reduce(wins.to(dist.device)).cpu().float()


def pref_advantages(judge: PairwiseJudge, images: torch.Tensor, plan, settings, pointwise: AdvantageResult | None = None,
                    pointwise_weight: float = 0.0, clip: bool = True) -> AdvantageResult:
    """`winrate` advantages of this process's rows from its ``images`` [b, 3, H, W] (clipped, unless ``clip`` is
    False, and zero-spread groups handled as the trainer's ``settings`` say); with ``pointwise`` advantages and
    ``pointwise_weight`` w > 0: (1 - w) A_winrate + w A_pointwise."""
    wins = group_winrates(judge, plan.gather(to_pixels(images)), plan)
    adv = compute_advantages("winrate", wins, plan.group_ids, adv_clip=(settings.adv_clip or None) if clip else None,
                             zero_std=settings.zero_std)
    a, v = adv.advantages[plan.indices].float(), adv.valid[plan.indices]
    stats = {**adv.stats, "winrate_std": float(wins.std())}
    w = pointwise_weight
    if pointwise is None or w == 0:
        return AdvantageResult(a, v, stats)
    valid = v & pointwise.valid
    mixed = torch.where(valid, (1 - w) * a + w * pointwise.advantages.float(), torch.zeros_like(a))
    stats.update({f"pointwise/{k}": x for k, x in pointwise.stats.items()})
    return AdvantageResult(mixed, valid, stats)


@dataclass(frozen=True)
class ImageScoring:
    """A run's reward, and its pairwise judge when it trains on Pref-GRPO win rates."""

    reward_fn: Any  # the reward contract: (images [B, 3, H, W], prompts, metadata) -> [B] (NaN = unscorable)
    judge: PairwiseJudge | None = None
    pointwise_weight: float = 0.0  # Pref-GRPO: the pointwise advantages' share of the mix

    def score(self, ro, plan) -> torch.Tensor:
        return self.reward_fn(ro.images, ro.prompts, ro.metadata)

    def advantages(self, images: torch.Tensor, rewards: torch.Tensor, plan, trainer, clip: bool = True) -> AdvantageResult:
        """Advantages of one set of images: Pref-GRPO win rates when a judge is set (mixed with the pointwise
        estimator's when pointwise_weight > 0), else the pointwise estimator's; clipped at the run's adv_clip unless
        ``clip`` is False. The `stratified` estimator's strata are the prompts' tags."""
        settings, pointwise = trainer.cfg, None
        if self.judge is None or self.pointwise_weight > 0:
            opts = {"strata": tag_strata(plan.rows)} if settings.advantage == "stratified" else {}
            pointwise = trainer.estimate(plan, rewards, prompt_keys=[r["prompt"] for r in plan.rows], clip=clip, **opts)
        if self.judge is None:
            return pointwise
        return pref_advantages(self.judge, images, plan, settings, pointwise, self.pointwise_weight, clip=clip)

    def value(self, ro, plan, rewards: torch.Tensor | None = None) -> torch.Tensor:
        """What an image is worth, [b]: its reward (``rewards`` when already scored), or with a pairwise judge its
        win rate within its group."""
        if self.judge is not None:
            return group_winrates(self.judge, plan.gather(to_pixels(ro.images)), plan)[plan.indices].double()
        return (rewards if rewards is not None else self.score(ro, plan)).double()


def tag_strata(rows: list[dict]) -> torch.Tensor:
    """[B] integer strata of the rows: their tags (in sorted order)."""
    tags = [r.get("tag") for r in rows]
    if not all(isinstance(t, str) for t in tags):
        raise ValueError("advantage 'stratified' on images takes its strata from the prompts' tags: every prompt "
                         "entry needs a 'tag'")
    names = sorted(set(tags))
    return torch.tensor([names.index(t) for t in tags])
