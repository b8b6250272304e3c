"""The trained elements of a batch as a policy evaluates them: a grid of rows x steps (an image's trained SDE
steps, a text's completion tokens) cut into chunks, each one forward pass, as its sampler made them."""
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
