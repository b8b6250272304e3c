"""Masked per-group statistics on flat tensors (the building blocks of the estimators).

Convention used across ``flowgrpo.core``: a NaN reward marks a sample with no reward; it is
left out of every statistic. Standard deviations are population ones (divide by n) unless
``unbiased=True`` — Flow-GRPO's ``np.std`` convention; TRL uses the unbiased one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_index", "group_mean_std", "masked_zscore", "mark_invalid"]


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer ids to dense indices 0..n_groups-1 (in sorted id order)."""
    if group_ids.ndim != 1:
        raise ValueError(f"group ids must be 1-D, got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group ids must be an integer tensor, got {group_ids.dtype}")
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def group_mean_std(
    values: Tensor, index: Tensor, n_groups: int, valid: Tensor, *, unbiased: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group (mean, std, count) of ``values[valid]``; groups with < 2 samples get std 0."""
    zeros = values.new_zeros(n_groups)
    count = zeros.index_add(0, index, valid.to(values.dtype))
    total = zeros.index_add(0, index, torch.where(valid, values, 0.0))
    mean = total / count.clamp(min=1)
    sq_dev = torch.where(valid, (values - mean[index]) ** 2, 0.0)
    ss = zeros.index_add(0, index, sq_dev)
    dof = count - 1 if unbiased else count
    std = torch.sqrt(ss / dof.clamp(min=1))
    return mean, std, count


def masked_zscore(values: Tensor, valid: Tensor, eps: float) -> Tensor:
    """(v - mean) / (std + eps) with mean/std over the valid entries; invalid entries -> NaN."""
    if not bool(valid.any()):
        return torch.full_like(values, float("nan"))
    v = values[valid]
    z = (values - v.mean()) / (v.std(correction=0) + eps)
    return mark_invalid(z, valid)


def mark_invalid(advantages: Tensor, valid: Tensor) -> Tensor:
    """Set NaN where ``valid`` is False (the estimators' 'no advantage' marker)."""
    return torch.where(valid, advantages, float("nan"))
