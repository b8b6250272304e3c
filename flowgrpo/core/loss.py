"""Per-element policy losses: PPO-clip and the two KL penalties (flows and tokens).

All functions return unreduced values; reduction is the job of ``aggregate.loss_weights``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ppo_clip_loss", "normalised_log_ratio", "gaussian_mean_kl", "k3_kl"]


def ppo_clip_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float,
    mask: Tensor | None = None, log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip: loss = max(-A·r, -A·clip(r, 1 - eps_low, 1 + eps_high)), r = exp(logp - old_logp), or
    r = exp(log_ratio) when a corrected log-ratio is given (GRPO-Guard's ``normalised_log_ratio``).

    logp, old_logp: [B, T] (old_logp is treated as a constant); advantages: [B] (broadcast over
    T) or [B, T]. Returns (loss_elem[B, T], stats) where stats are detached 0-dim tensors
    (no host sync): ``clip_frac`` = fraction of elements where the clipped branch is strictly
    larger (its gradient is zero), ``ratio_mean/min/max``; computed over ``mask`` if given
    (NaN when the mask is empty), else over all elements.
    """
    if logp.ndim != 2 or old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp must both be [B, T], got {tuple(logp.shape)}, {tuple(old_logp.shape)}")
    if advantages.ndim == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if log_ratio is not None and log_ratio.shape != logp.shape:
        raise ValueError(f"log_ratio must be shaped like logp {tuple(logp.shape)}, got {tuple(log_ratio.shape)}")
    ratio = torch.exp(logp - old_logp.detach() if log_ratio is None else log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)

    with torch.no_grad():
        sel = torch.ones_like(ratio, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if sel.shape != ratio.shape:
            raise ValueError(f"mask must have shape {tuple(ratio.shape)}, got {tuple(sel.shape)}")
        r = ratio[sel]
        nan = ratio.new_tensor(float("nan"))
        empty = r.numel() == 0
        stats = {
            "clip_frac": nan if empty else (clipped > unclipped)[sel].to(ratio.dtype).mean(),
            "ratio_mean": nan if empty else r.mean(),
            "ratio_min": nan if empty else r.min(),
            "ratio_max": nan if empty else r.max(),
        }
    return loss, stats


def normalised_log_ratio(logp: Tensor, old_logp: Tensor, mean_shift_sq: Tensor, std: Tensor) -> Tensor:
    """GRPO-Guard's ratio normalisation (Wang et al., 2025, arXiv 2510.22319) of a Gaussian step's log-ratio.

    With x = mu_old + s eps sampled, log-probs averaged over the D coordinates, and d = mu - mu_old, the log-ratio
    is mean(d eps) / s - mean(d^2) / (2 s^2): its second term biases every ratio below 1, most at the low-noise
    steps where s is small, and its spread scales with 1 / s. The normalised log-ratio removes the bias and the scale:
    (logp - old_logp) s + mean(d^2) / (2 s) = mean(d eps), the form Flow-Factory's GRPOGuardTrainer computes.
    All arguments are per element ([B, T]); ``mean_shift_sq`` = mean(d^2), ``std`` = s. 0 when mu = mu_old.
    """
    return (logp - old_logp.detach()) * std + mean_shift_sq / (2 * std)


def _per_sample_std(std: Tensor | float, like: Tensor) -> Tensor | float:
    if isinstance(std, Tensor) and std.ndim == 1 and std.shape[0] == like.shape[0] and like.ndim > 1:
        return std.reshape(-1, *([1] * (like.ndim - 1)))
    return std


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) for one Gaussian SDE step, per sample.

    Per latent element the KL of two Gaussians with equal std is (μθ - μref)² / (2σ²); it is
    averaged over the latent elements (all dims but the first) -> [B], matching the log-prob's
    mean-over-elements convention. ``std`` is a scalar, a per-sample [B] tensor, or anything
    broadcastable to ``mean``.
    """
    if mean.shape != ref_mean.shape or mean.ndim < 1:
        raise ValueError(f"mean and ref_mean must share a shape [B, ...], got {tuple(mean.shape)}, {tuple(ref_mean.shape)}")
    std = _per_sample_std(std, mean)
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    if kl.shape != mean.shape:
        raise ValueError(f"std of shape {tuple(std.shape)} does not broadcast to {tuple(mean.shape)}")
    return kl.reshape(mean.shape[0], -1).mean(dim=1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref) for tokens sampled from π:
    exp(ref_logp - logp) - (ref_logp - logp) - 1 (≥ 0, 0 where the log-probs agree)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    d = ref_logp - logp
    return torch.exp(d) - d - 1
