"""Loss aggregation as one weight tensor per optimizer step.

``loss_weights`` is built once from the masks of the WHOLE optimizer step (all micro-batches,
all ranks, concatenated). The step's loss is sum(W * loss_elem), which is linear in the
elements: each micro-batch (or timestep, or rank) backpropagates sum(W_part * loss_part) and
the accumulated gradient is exactly that of the whole batch, whatever the split. With several
ranks whose gradients are averaged by DDP, multiply each rank's part by the number of ranks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["AGGREGATIONS", "loss_weights"]


def _token_mean(m: Tensor, n_seq: int, max_len: int) -> Tensor:
    # every token of the step counts equally
    return m / m.sum().clamp(min=1)


def _seq_mean_token_mean(m: Tensor, n_seq: int, max_len: int) -> Tensor:
    # mean over tokens within a sequence, then mean over sequences
    return m / (n_seq * m.sum(dim=1, keepdim=True).clamp(min=1))


def _seq_mean_token_sum(m: Tensor, n_seq: int, max_len: int) -> Tensor:
    # sum over tokens within a sequence, then mean over sequences
    return m / n_seq


def _seq_mean_token_sum_norm(m: Tensor, n_seq: int, max_len: int) -> Tensor:
    # Dr.GRPO: token sum divided by a constant length, so long answers are not down-weighted
    return m / (n_seq * max_len)


# mode -> fn(m[B, T] (0/1, invalid rows zeroed), n_seq, max_len) -> W[B, T]
AGGREGATIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def loss_weights(
    mask: Tensor, mode: str, *, valid: Tensor | None = None, max_len: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Weights W[B, T] such that the step loss is sum(W * loss_elem).

    mask: [B, T] (bool or 0/1) over the full optimizer-step batch. valid: [B] bool
    (``AdvantageResult.valid``); False rows get weight 0. n_seq counts the valid rows that have
    at least one token. max_len: the constant length of ``seq-mean-token-sum-norm``
    (default T). dtype: of W (default: mask's float dtype, else torch's default dtype).
    A step with no tokens gives W = 0.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose from {sorted(AGGREGATIONS)}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if dtype is None:
        dtype = mask.dtype if mask.dtype.is_floating_point else torch.get_default_dtype()
    m = mask.to(dtype)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("mask entries must be 0 or 1")
    if valid is not None:
        if valid.shape != (mask.shape[0],) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape ({mask.shape[0]},)")
        m = m * valid.to(device=m.device, dtype=dtype)[:, None]
    if max_len is None:
        max_len = mask.shape[1]
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    n_seq = int((m.sum(dim=1) > 0).sum())
    if n_seq == 0:
        return torch.zeros_like(m)
    return AGGREGATIONS[mode](m, n_seq, max_len)
