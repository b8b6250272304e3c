"""flowgrpo.core: the GRPO algorithm core on plain tensors (torch only; no images, no text).

Advantages (``compute_advantages`` over the ``ADVANTAGES`` registry), PPO-clip and KL losses,
loss aggregation as one weight tensor per optimizer step, and the per-prompt stat tracker.
"""

from flowgrpo.core.advantages import (
    ADVANTAGES,
    PER_COLUMN_ESTIMATORS,
    TRACKED_ESTIMATORS,
    AdvantageResult,
    compute_advantages,
)
from flowgrpo.core.aggregate import AGGREGATIONS, loss_weights
from flowgrpo.core.estimators import winrate_from_preferences
from flowgrpo.core.loss import gaussian_mean_kl, k3_kl, normalised_log_ratio, ppo_clip_loss
from flowgrpo.core.tracked_estimators import bnpo_beta_params
from flowgrpo.core.tracker import PromptStats, PromptStatTracker

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "PER_COLUMN_ESTIMATORS",
    "TRACKED_ESTIMATORS",
    "AdvantageResult",
    "PromptStatTracker",
    "PromptStats",
    "bnpo_beta_params",
    "compute_advantages",
    "gaussian_mean_kl",
    "k3_kl",
    "loss_weights",
    "normalised_log_ratio",
    "ppo_clip_loss",
    "winrate_from_preferences",
]
