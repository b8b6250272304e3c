"""Pref-GRPO: advantages from pairwise win rates within each group, optionally mixed with pointwise ones."""
from __future__ import annotations

import torch

from flowgrpo.config import TrainConfig
from flowgrpo.core import AdvantageResult, compute_advantages, winrate_from_preferences
from flowgrpo.policies.flow import Rollout
from flowgrpo.rewards import PairwiseJudge, preference_matrix


def group_winrates(judge: PairwiseJudge, ro: Rollout) -> torch.Tensor:
    """Each sample's mean win probability against the other members of its group (all G(G-1)/2 pairs)."""
    wins = torch.empty(len(ro))
    for g in ro.group_ids.unique():
        rows = torch.nonzero(ro.group_ids == g).flatten()
        first = int(rows[0])
        s = preference_matrix(judge, ro.prompts[first], ro.images[rows], ro.metadata[first])
        wins[rows] = winrate_from_preferences(s).float()
    return wins


def pref_advantages(judge: PairwiseJudge, ro: Rollout, rewards: torch.Tensor, cfg: TrainConfig) -> AdvantageResult:
    """`winrate` advantages; with pointwise_weight w > 0: (1 - w) A_winrate + w A_pointwise."""
    wins = group_winrates(judge, ro)
    adv = compute_advantages("winrate", wins, ro.group_ids, adv_clip=cfg.adv_clip, zero_std=cfg.zero_std)
    stats = {**adv.stats, "winrate_std": float(wins.std())}
    if cfg.pointwise_weight == 0:
        return AdvantageResult(adv.advantages, adv.valid, stats)
    point = compute_advantages(cfg.advantage, rewards, ro.group_ids, adv_clip=cfg.adv_clip, zero_std=cfg.zero_std,
                               **cfg.advantage_options)
    valid = adv.valid & point.valid
    w = cfg.pointwise_weight
    mixed = torch.where(valid, (1 - w) * adv.advantages + w * point.advantages, torch.zeros_like(adv.advantages))
    stats.update({f"pointwise/{k}": v for k, v in point.stats.items()})
    return AdvantageResult(mixed, valid, stats)
