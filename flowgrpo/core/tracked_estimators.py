"""Advantage estimators with persistent per-prompt state (BNPO, SPO).

Both take ``tracker`` (a ``PromptStatTracker``) and ``prompt_keys`` (one str per sample) and
follow the estimator contract of ``flowgrpo.core.estimators`` (NaN reward in -> NaN advantage
out). NaN rewards never reach the tracker.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from flowgrpo.core.grouping import mark_invalid, masked_zscore
from flowgrpo.core.tracker import PromptStatTracker

__all__ = ["bnpo", "spo", "bnpo_beta_params"]


def _keys_by_sample(prompt_keys: Sequence[str], rewards: Tensor) -> dict[str, list[int]]:
    if len(prompt_keys) != rewards.shape[0]:
        raise ValueError(f"need one prompt key per sample: {len(prompt_keys)} keys, {rewards.shape[0]} rewards")
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(prompt_keys):
        rows.setdefault(key, []).append(i)
    return rows


def _valid_rewards(rewards: Tensor, rows: list[int]) -> list[float]:
    return [float(rewards[i]) for i in rows if not math.isnan(float(rewards[i]))]


def bnpo_beta_params(success_rates: Tensor) -> tuple[float, float]:
    """BNPO's normaliser parameters from the spread of per-prompt success rates p(q).

    Method-of-moments fit Beta(a, b) to the rates (mean m, unbiased variance v):
    c = m(1 - m)/v - 1, a = c·m, b = c·(1 - m); then alpha = 1 + a/3, beta = 1 + b/3 (the
    variance-minimising choice of the BNPO paper; its reference code also floors them at 1). Falls back to (1, 1) — REINFORCE with baseline — when fewer than two
    prompts or no spread make the fit undefined.
    """
    if success_rates.numel() < 2:
        return 1.0, 1.0
    m = float(success_rates.mean())
    v = float(success_rates.var(correction=1))
    if v <= 0.0 or m * (1 - m) / v - 1 <= 0.0:
        return 1.0, 1.0
    c = m * (1 - m) / v - 1  # > 0 here, so both parameters are >= 1
    return 1 + c * m / 3, 1 + c * (1 - m) / 3


def bnpo(
    rewards: Tensor, group_ids: Tensor, *, tracker: PromptStatTracker, prompt_keys: Sequence[str],
    decay: float = 0.9, beta_params: tuple[float, float] | None = None,
    r_min: float = 0.0, r_max: float = 1.0, max_weight: float = 1e6,
) -> Tensor:
    """BNPO (Xiao et al. 2025, "Beta Normalization Policy Optimization") for rewards in
    [r_min, r_max] (binary or fractional success), rescaled to [0, 1]:

        A = (r - p(q)) / f(p(q); alpha, beta),   f = Beta(alpha, beta) density.

    p(q) is the prompt's success rate: the posterior mean of its Beta in ``tracker`` after
    adding this batch's outcomes (old evidence scaled by ``decay``; decay 0 = the paper's
    per-group Monte-Carlo mean, Laplace-smoothed by the tracker prior). (alpha, beta) come from
    ``bnpo_beta_params`` over the batch's prompts unless ``beta_params`` fixes them:
    (1, 1) gives REINFORCE with baseline; (1.5, 1.5) gives f ∝ sqrt(p(1-p)), GRPO's Bernoulli std.
    The weight 1/f is capped at ``max_weight``. ``group_ids`` is not used (keys define prompts).
    """
    if r_max <= r_min:
        raise ValueError(f"bnpo needs r_max > r_min, got {r_min}, {r_max}")
    scaled = (rewards - r_min) / (r_max - r_min)
    valid = ~torch.isnan(scaled)
    if bool(((scaled[valid] < 0) | (scaled[valid] > 1)).any()):
        raise ValueError(f"bnpo rewards must lie in [r_min, r_max] = [{r_min}, {r_max}]")
    rows = _keys_by_sample(prompt_keys, scaled)
    for key, idx in rows.items():
        tracker.observe_beta(key, _valid_rewards(scaled, idx), decay=decay)
    rates = {key: tracker.beta_mean(key) for key in rows}
    p = scaled.new_tensor([rates[key] for key in prompt_keys])
    if beta_params is None:
        beta_params = bnpo_beta_params(scaled.new_tensor(list(rates.values())))
    alpha, beta = (scaled.new_tensor(float(x)) for x in beta_params)
    density = torch.distributions.Beta(alpha, beta).log_prob(p).exp()
    weight = (1.0 / density).clamp(max=max_weight)
    return mark_invalid(weight * (scaled - p), valid)


def spo(
    rewards: Tensor, group_ids: Tensor, *, tracker: PromptStatTracker, prompt_keys: Sequence[str],
    value: str = "beta", decay: float = 0.9, eps: float = 1e-4,
) -> Tensor:
    """SPO (single-stream policy optimisation): A = z-score over the batch of r - v(prompt).

    v is read BEFORE this batch updates the tracker: ``value="beta"`` uses the posterior mean of
    the prompt's Beta (rewards must lie in [0, 1]; an unseen prompt gets the prior mean),
    ``value="ema"`` the EMA of its rewards (an unseen prompt falls back to the mean of its
    rewards in this batch). Afterwards every prompt's valid rewards update the tracker with
    ``decay`` (SPO's KL-adaptive forgetting factor; pass a new value per call to adapt it).
    ``group_ids`` is not used: SPO needs no groups.
    """
    if value not in ("beta", "ema"):
        raise ValueError(f"spo value must be 'beta' or 'ema', got {value!r}")
    valid = ~torch.isnan(rewards)
    if value == "beta" and bool(((rewards[valid] < 0) | (rewards[valid] > 1)).any()):
        raise ValueError("spo with value='beta' needs rewards in [0, 1]; use value='ema'")
    rows = _keys_by_sample(prompt_keys, rewards)
    observed = {key: _valid_rewards(rewards, idx) for key, idx in rows.items()}
    baseline = rewards.new_zeros(rewards.shape)
    for key, idx in rows.items():
        if value == "beta":
            v = tracker.beta_mean(key)
        else:
            v = tracker.value(key)
            if v is None:
                v = sum(observed[key]) / len(observed[key]) if observed[key] else 0.0
        baseline[idx] = v
    adv = masked_zscore(rewards - baseline, valid, eps)
    for key, values in observed.items():
        if value == "beta":
            tracker.observe_beta(key, values, decay=decay)
        else:
            tracker.observe_value(key, values, decay=decay)
    return adv
