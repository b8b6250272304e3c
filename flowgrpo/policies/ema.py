"""An exponential moving average of the trainable weights (Polyak averaging).

Policy-gradient updates are noisy: consecutive iterates of the same run can differ by several accuracy points.
Evaluation and export use the average, which keeps the drift and smooths the noise; rollouts keep using the live
weights, so training stays on-policy. Flow-GRPO evaluates an EMA of its LoRA weights the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from flowgrpo.policies.state import full_tensor


def ramp_decay(flat: int, rate: float, cap: float) -> Callable[[int], float]:
    """d(n) = 0 for n < flat, then min((n - flat) * rate, cap): a lagged copy that starts as the weights themselves
    and holds on to its past more and more (DiffusionNFT's old-policy schedule; Flow-Factory's linear warm-up is
    flat 0, rate cap / warm-up steps)."""
    if flat < 0 or rate < 0 or not 0 <= cap < 1:
        raise ValueError(f"ramp_decay needs flat >= 0, rate >= 0 and cap in [0, 1), got {flat}, {rate}, {cap}")
    return lambda n: 0.0 if n < flat else min((n - flat) * rate, cap)


class WeightEMA:
    """shadow <- d * shadow + (1 - d) * weights after every update; by default d = min(decay, (1 + n) / (10 + n))
    at update n, so the average follows the weights closely at the start instead of holding on to the base model.
    ``schedule`` gives d(n) instead (n counts the updates from 1: d(n) is the decay of the n-th)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.0, *,
                 schedule: Callable[[int], float] | None = None) -> None:
        if schedule is None and not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.schedule = schedule or (lambda n: min(self.decay, n / (9 + n)))
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.schedule(self.updates + 1)
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - d)
        self.updates += 1

    def load(self, shadow: dict[str, torch.Tensor], *, updates: int, where: str = "checkpoint") -> None:
        """Restore a saved average (names must match the trainable parameters) and its update count."""
        from flowgrpo.policies.state import like

        if set(shadow) != set(self.shadow):
            raise ValueError(f"{where}: its weight EMA does not match the run's trainable parameters")
        for n, t in shadow.items():
            self.shadow[n].copy_(like(self.shadow[n], t))
        self.updates = updates

    def full(self) -> dict[str, torch.Tensor]:
        """The average as whole tensors (a collective when the weights are sharded)."""
        return {n: full_tensor(t).cpu() for n, t in self.shadow.items()}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Swap the average into the model for the duration of the block, then restore the live weights."""
        params = {n: p for n, p in model.named_parameters() if n in self.shadow}
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])
