"""The trained elements of a batch as a policy evaluates them: a grid of rows x steps (an image's trained SDE
steps, a text's completion tokens) cut into chunks, each one forward pass, as its sampler made them; and the batch
the update trains on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Chunk:
    """Elements evaluated by one forward pass: local ``rows`` x step columns ``cols``; ``call`` is the policy's own
    note of how to evaluate them (e.g. which shared rows a G²RPO group's branch velocity came from)."""

    rows: Tensor  # local row indices
    cols: slice
    key: tuple  # identifies the chunk (the reference outputs are cached under it)
    call: Any = None


def grid_chunks(rows: slice, micro_batch: int, columns: list[slice]) -> list[Chunk]:
    """Micro-batches of consecutive rows times each column slice (rows sampled in the same micro-batches)."""
    return [Chunk(torch.arange(m, min(m + micro_batch, rows.stop)), c, (m, c.start))
            for m in range(rows.start, rows.stop, micro_batch) for c in columns]


@dataclass
class UpdateBatch:
    """One process's rows of an iteration, in its layout order, as the update sees them."""

    rollout: Any  # the policy's own rollout (images or tokens)
    mask: Tensor  # [b, S] 0/1: the elements that carry loss
    advantages: Tensor  # [b], or [b, S] for per-step advantages
    valid: Tensor  # [b] bool: rows with an advantage (False = zero weight)
    sampled_logp: Tensor  # [b, S] log-probs recorded while sampling
    max_len: int  # S of the widest batch any process can have (pads the masks gathered for W)
    # True: the first epoch's recomputed log-probs are the behaviour policy's (text: the sampler's KV-cache
    # arithmetic differs from the training forward in the last bits); False: the sampled ones are (images).
    recompute_old: bool = False
    # what evaluates the trained elements (chunks, log_prob, reference_out, kl); None = the policy itself
    elements: Any = None
    # GRPO-Guard: the PPO ratio from `normalised_log_ratio`, with the elements' ``mean_shift`` (Gaussian steps)
    ratio_norm: bool = False
    # [b, S] sigma - sigma_next of each element's SDE step: flow_grpo's KL convention is the exact one times it
    step_dt: Tensor | None = None
