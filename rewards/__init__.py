"""Rewards: the pointwise and pairwise contracts, the registry, and combinations.

Reward models with heavy dependencies live in their own modules and are imported when built
(``build_reward("clipscore", checkpoint=..., arch=...)``).
"""
from flowgrpo.rewards.base import (
    JUDGES,
    REWARDS,
    PairwiseJudge,
    Reward,
    RewardFn,
    build_judge,
    build_reward,
    register_judge,
    register_reward,
)
from flowgrpo.rewards.combine import MultiReward, WeightedSum
from flowgrpo.rewards.pairwise import PointwiseAsPairwise, bradley_terry, preference_matrix

__all__ = [
    "JUDGES", "REWARDS", "MultiReward", "PairwiseJudge", "PointwiseAsPairwise", "Reward", "RewardFn", "WeightedSum",
    "bradley_terry", "build_judge", "build_reward", "preference_matrix", "register_judge", "register_reward",
]
