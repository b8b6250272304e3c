"""Group-relative advantage estimators (stateless).

Contract shared by every estimator in the ``ADVANTAGES`` registry:
``fn(rewards, group_ids, **opts) -> Tensor[B]``. ``rewards`` is a float Tensor[B] (Tensor[B, K]
for ``gdpo``) where NaN marks an unscorable sample; NaN samples are left out of every statistic.
The result is the raw (unclipped) advantage; NaN in the result means "no advantage, zero loss
weight" (NaN rewards, the MC-GRPO pivot). ``compute_advantages`` turns that into ``valid``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowgrpo.core.grouping import group_index, group_mean_std, mark_invalid, masked_zscore

__all__ = [
    "grpo", "rloo", "mc_grpo", "gdpo", "ngrpo", "stratified", "winrate",
    "winrate_from_preferences",
]


def grpo(
    rewards: Tensor, group_ids: Tensor, *, scale: str = "group", eps: float = 1e-4,
    unbiased: bool = False,
) -> Tensor:
    """GRPO: (r - group mean) / (std + eps).

    ``scale``: "group" = the group's std; "batch" = std of all rewards in the batch;
    "none" = no division (Dr.GRPO). ``unbiased`` picks the n-1 std (default: population std).
    """
    valid = ~torch.isnan(rewards)
    index, n = group_index(group_ids)
    mean, std, _ = group_mean_std(rewards, index, n, valid, unbiased=unbiased)
    centred = rewards - mean[index]
    if scale == "group":
        adv = centred / (std[index] + eps)
    elif scale == "batch":
        r = rewards[valid]
        batch_std = r.std(correction=1 if unbiased else 0) if r.numel() > 1 else r.new_zeros(())
        adv = centred / (batch_std + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"grpo scale must be 'group', 'batch' or 'none', got {scale!r}")
    return mark_invalid(adv, valid)


def rloo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out: r_i - mean of the other valid rewards of its group.

    A sample alone in its group has no baseline and gets advantage 0.
    """
    valid = ~torch.isnan(rewards)
    index, n = group_index(group_ids)
    mean, _, count = group_mean_std(rewards, index, n, valid)
    c = count[index]
    # r_i - (sum - r_i)/(c - 1) = c/(c - 1) * (r_i - mean)
    adv = torch.where(c > 1, c / (c - 1).clamp(min=1) * (rewards - mean[index]), 0.0)
    return mark_invalid(adv, valid)


def mc_grpo(
    rewards: Tensor, group_ids: Tensor, *, scale: str = "mad", eps: float = 1e-3
) -> Tensor:
    """MC-GRPO: median baseline over G+1 samples; the median "pivot" sample is excluded.

    A = (r - median) / (MAD + eps) (``scale="mad"``) or / (std + eps) (``scale="std"``,
    population std). The pivot is the middle element of the group's valid rewards sorted by
    (reward, position in the batch); with an even valid count (e.g. after a NaN) it is the
    lower middle. The pivot gets NaN (= zero loss weight). With binary rewards the MAD is
    usually 0 (most of the group equals the median), giving |A| = 1/eps: use ``scale="std"``.
    """
    if scale not in ("mad", "std"):
        raise ValueError(f"mc_grpo scale must be 'mad' or 'std', got {scale!r}")
    valid = ~torch.isnan(rewards)
    index, n = group_index(group_ids)
    adv = torch.full_like(rewards, float("nan"))
    for g in range(n):
        members = torch.nonzero((index == g) & valid).squeeze(1)
        if members.numel() == 0:
            continue
        vals = rewards[members]
        order = torch.sort(vals, stable=True).indices  # ties keep batch order
        pivot = order[(members.numel() - 1) // 2]
        median = vals[pivot]
        if scale == "mad":
            spread = torch.sort((vals - median).abs()).values[(members.numel() - 1) // 2]
        else:
            spread = vals.std(correction=0)
        a = (vals - median) / (spread + eps)
        a[pivot] = float("nan")
        adv[members] = a
    return adv


def gdpo(
    rewards: Tensor, group_ids: Tensor, *, reward_weights: Tensor | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """GDPO: z-score each reward column within its group, weighted sum, then batch z-score.

    ``rewards`` is [B, K] (a [B] tensor is one column); a sample with any NaN column is invalid.
    Decoupling keeps reward combinations such as (1, 0) and (0, 1) apart when the columns have
    different within-group spreads, where GRPO on the summed reward would merge them.
    """
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    k = rewards.shape[1]
    weights = rewards.new_ones(k) if reward_weights is None else reward_weights.to(rewards)
    if weights.shape != (k,):
        raise ValueError(f"reward_weights must have shape ({k},), got {tuple(weights.shape)}")
    valid = ~torch.isnan(rewards).any(dim=1)
    index, n = group_index(group_ids)
    total = torch.zeros_like(rewards[:, 0])
    for j in range(k):
        col = rewards[:, j]
        mean, std, _ = group_mean_std(col, index, n, valid)
        total = total + weights[j] * torch.where(valid, (col - mean[index]) / (std[index] + eps), 0.0)
    return masked_zscore(total, valid, eps)


def ngrpo(rewards: Tensor, group_ids: Tensor, *, r_max: float = 1.0, eps: float = 1e-4) -> Tensor:
    """NGRPO advantage calibration: one virtual sample with reward ``r_max`` joins each group's
    mean and (population) std; it gets no advantage itself. All-wrong groups thus get a
    negative signal; all-``r_max`` groups still get 0.
    """
    valid = ~torch.isnan(rewards)
    if bool((rewards[valid] > r_max).any()):
        raise ValueError(f"ngrpo: a reward exceeds r_max={r_max}; r_max must be the maximum reward")
    index, n = group_index(group_ids)
    zeros = rewards.new_zeros(n)
    count = zeros.index_add(0, index, valid.to(rewards.dtype)) + 1
    mean = (zeros.index_add(0, index, torch.where(valid, rewards, 0.0)) + r_max) / count
    sq_dev = torch.where(valid, (rewards - mean[index]) ** 2, 0.0)
    var = (zeros.index_add(0, index, sq_dev) + (r_max - mean) ** 2) / count
    adv = (rewards - mean[index]) / (var.sqrt()[index] + eps)
    return mark_invalid(adv, valid)


def stratified(
    rewards: Tensor, group_ids: Tensor, *, strata: Tensor, alpha: float, eps: float = 1e-4
) -> Tensor:
    """Stratified GRPO (SAN): A = alpha * z_stratum + (1 - alpha) * z_batch.

    ``strata[B]`` are integer stratum keys (encode (prompt, stratum) pairs in the key if strata
    should be nested in prompts). z-scores use population stds. ``group_ids`` is not used here.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"stratified alpha must be in [0, 1], got {alpha}")
    if strata.shape != rewards.shape:
        raise ValueError(f"strata must have shape {tuple(rewards.shape)}, got {tuple(strata.shape)}")
    valid = ~torch.isnan(rewards)
    index, n = group_index(strata)
    mean, std, _ = group_mean_std(rewards, index, n, valid)
    z_stratum = (rewards - mean[index]) / (std[index] + eps)
    z_batch = masked_zscore(rewards, valid, eps)
    return mark_invalid(alpha * z_stratum + (1.0 - alpha) * z_batch, valid)


def winrate(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Pref-GRPO: ``rewards`` are the samples' win rates within their group (computed first with
    ``winrate_from_preferences``); A = (w - group mean) / (group std + eps), population std.
    """
    valid = ~torch.isnan(rewards)
    if bool(((rewards[valid] < 0) | (rewards[valid] > 1)).any()):
        raise ValueError("winrate: rewards must be win rates in [0, 1]")
    return grpo(rewards, group_ids, scale="group", eps=eps)


def winrate_from_preferences(pref: Tensor) -> Tensor:
    """Win rates w_i = sum_{j != i} s_ij / (G - 1) from a preference matrix s[G, G] in [0, 1],
    where s_ij = P(sample i is preferred over sample j). The diagonal is ignored.
    """
    if pref.ndim != 2 or pref.shape[0] != pref.shape[1] or pref.shape[0] < 2:
        raise ValueError(f"preference matrix must be [G, G] with G >= 2, got {tuple(pref.shape)}")
    g = pref.shape[0]
    off_diag = ~torch.eye(g, dtype=torch.bool, device=pref.device)
    if bool(((pref[off_diag] < 0) | (pref[off_diag] > 1)).any()):
        raise ValueError("preference probabilities must lie in [0, 1]")
    return torch.where(off_diag, pref, 0.0).sum(dim=1) / (g - 1)
