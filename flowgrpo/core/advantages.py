"""Advantage estimator registry and the one entry point every trainer calls.

``compute_advantages`` owns everything the estimators share: multi-reward combination, NaN
(unscorable) rewards, zero-variance groups, clipping, cross-process gathering and logging stats.
The estimators themselves live in ``estimators`` (stateless) and ``tracked_estimators``
(per-prompt state in a ``PromptStatTracker``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowgrpo.core.estimators import gdpo, grpo, mc_grpo, ngrpo, rloo, stratified, winrate
from flowgrpo.core.grouping import group_index
from flowgrpo.core.tracked_estimators import bnpo, spo

__all__ = ["ADVANTAGES", "PER_COLUMN_ESTIMATORS", "TRACKED_ESTIMATORS", "AdvantageResult", "compute_advantages"]

# name -> fn(rewards, group_ids, **opts) -> raw advantages[B] (NaN = zero loss weight).
# ``winrate`` takes the samples' win rates as its rewards (see winrate_from_preferences).
ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo,
    "rloo": rloo,
    "mc_grpo": mc_grpo,
    "gdpo": gdpo,
    "bnpo": bnpo,
    "ngrpo": ngrpo,
    "stratified": stratified,
    "spo": spo,
    "winrate": winrate,
}

# Estimators that receive the [B, K] reward matrix (and ``reward_weights``) instead of the
# weighted sum of the columns.
PER_COLUMN_ESTIMATORS = frozenset({"gdpo"})

# Estimators that keep per-prompt state across iterations in a ``PromptStatTracker`` (``tracker``,
# ``prompt_keys``); the trainer owns and checkpoints the tracker.
TRACKED_ESTIMATORS = frozenset({"bnpo", "spo"})


@dataclass(frozen=True)
class AdvantageResult:
    """``advantages[B]`` (0 where not valid), ``valid[B]`` (False = zero loss weight: NaN reward,
    MC-GRPO pivot, dropped zero-std group) and float ``stats`` for logging."""

    advantages: Tensor
    valid: Tensor
    stats: dict[str, float]


def _reward_matrix(rewards: Tensor) -> Tensor:
    if rewards.ndim not in (1, 2) or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty [B] or [B, K] tensor, got {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float64)
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards contain inf; use NaN to mark unscorable samples")
    return rewards if rewards.ndim == 2 else rewards[:, None]


def _zero_std_groups(values: Tensor, group_ids: Tensor, scored: Tensor) -> tuple[Tensor, int, int]:
    """Per sample: does its group have a constant value in every column among the scored
    samples? Also returns (#groups, #groups with at least one scored sample)."""
    index, n = group_index(group_ids)
    k = values.shape[1]
    idx = index[:, None].expand(-1, k)
    inf = float("inf")
    hi = values.new_full((n, k), -inf).scatter_reduce(0, idx, torch.where(scored[:, None], values, -inf), "amax")
    lo = values.new_full((n, k), inf).scatter_reduce(0, idx, torch.where(scored[:, None], values, inf), "amin")
    has_scored = torch.zeros(n, dtype=torch.bool).index_fill(0, index[scored], True)
    zero = has_scored & (hi == lo).all(dim=1)
    return zero[index], n, int(has_scored.sum())


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    adv_clip: float | None = None,
    zero_std: str = "keep",
    reward_weights: Tensor | list[float] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    local_slice: slice | None = None,
    **opts,
) -> AdvantageResult:
    """Advantages for one batch with the estimator ``ADVANTAGES[name]``.

    rewards: [B] or [B, K] float; NaN = unscorable (valid False, left out of every statistic,
        counted in ``n_nan``; a sample with any NaN column counts as NaN).
    group_ids: integer [B]; samples of the same prompt share an id (globally unique ids when
        ``gather`` is used).
    reward_weights: [K] weights; the K columns are combined into sum_k w_k r_k (default: equal
        sum) before the estimator, except for per-column estimators (``gdpo``) which get both.
    zero_std: "keep" leaves zero-variance groups with whatever the estimator gives (0 for grpo,
        a negative signal for ngrpo); "drop" marks their samples invalid.
    adv_clip: clip advantages to [-adv_clip, adv_clip].
    gather / local_slice: for per-prompt statistics spanning processes. ``gather`` (e.g.
        ``accelerator.gather``) concatenates a tensor over all ranks; rewards, group_ids and
        every Tensor-valued option are gathered (so Tensor options must be per-sample), the
        advantages are computed on the global batch and ``local_slice`` of them returned.
        Non-tensor options (``prompt_keys``) must already describe the global batch. Stats
        are global.
    opts: passed to the estimator (e.g. ``scale``, ``eps``, ``strata``, ``alpha``, ``tracker``,
        ``prompt_keys``).

    Computed on CPU in float64 (batches are small); returned on the rewards' device, in their
    float dtype (the default dtype for integer rewards).

    Stats: n_nan, frac_nan, n_groups, frac_zero_std (among groups with a scored sample),
    n_valid, frac_clipped (among valid samples), adv_mean, adv_std (population, over valid).
    """
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; choose from {sorted(ADVANTAGES)}")
    if zero_std not in ("keep", "drop"):
        raise ValueError(f"zero_std must be 'keep' or 'drop', got {zero_std!r}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be positive or None, got {adv_clip}")
    if (gather is None) != (local_slice is None):
        raise ValueError("gather and local_slice must be given together")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.get_default_dtype()
    device = rewards.device
    if gather is not None:
        rewards, group_ids = gather(rewards), gather(group_ids)
        opts = {k: gather(v) if isinstance(v, Tensor) else v for k, v in opts.items()}

    matrix = _reward_matrix(rewards.cpu())
    group_ids = group_ids.cpu()
    opts = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in opts.items()}
    b, k = matrix.shape
    if group_ids.shape != (b,):
        raise ValueError(f"group_ids must have shape ({b},), got {tuple(group_ids.shape)}")
    weights = torch.ones(k, dtype=torch.float64)
    if reward_weights is not None:
        weights = torch.as_tensor(reward_weights, dtype=torch.float64).cpu()
        if weights.shape != (k,):
            raise ValueError(f"reward_weights must have {k} entries, got shape {tuple(weights.shape)}")

    nan = torch.isnan(matrix).any(dim=1)
    if name in PER_COLUMN_ESTIMATORS:
        used = matrix
        raw = ADVANTAGES[name](matrix, group_ids, reward_weights=weights, **opts)
    else:
        used = (matrix * weights).sum(dim=1, keepdim=True)
        raw = ADVANTAGES[name](used[:, 0], group_ids, **opts)
    if raw.shape != (b,):
        raise RuntimeError(f"estimator {name!r} returned shape {tuple(raw.shape)}, expected ({b},)")
    if bool(torch.isinf(raw).any()):
        raise RuntimeError(f"estimator {name!r} produced infinite advantages")

    valid = ~torch.isnan(raw)
    zero_sample, n_groups, n_scored_groups = _zero_std_groups(used, group_ids, ~nan)
    if zero_std == "drop":
        valid &= ~zero_sample
    adv = torch.where(valid, raw, 0.0)
    clipped = torch.zeros_like(valid)
    if adv_clip is not None:
        clipped = valid & (adv.abs() > adv_clip)
        adv = adv.clamp(-adv_clip, adv_clip)

    n_valid = int(valid.sum())
    kept = adv[valid]
    n_zero_groups = len(set(group_ids[zero_sample].tolist()))
    stats = {
        "n_nan": float(nan.sum()),
        "frac_nan": float(nan.sum()) / b,
        "n_groups": float(n_groups),
        "frac_zero_std": n_zero_groups / n_scored_groups if n_scored_groups else float("nan"),
        "n_valid": float(n_valid),
        "frac_clipped": float(clipped.sum()) / n_valid if n_valid else 0.0,
        "adv_mean": float(kept.mean()) if n_valid else float("nan"),
        "adv_std": float(kept.std(correction=0)) if n_valid else float("nan"),
    }
    if local_slice is not None:
        adv, valid = adv[local_slice], valid[local_slice]
    return AdvantageResult(adv.to(device=device, dtype=out_dtype), valid.to(device), stats)
