"""An exponential moving average of the trainable weights (Polyak averaging).

Policy-gradient updates are noisy: consecutive iterates of the same run can differ by several accuracy points.
Evaluation and export use the average, which keeps the drift and smooths the noise; rollouts keep using the live
weights, so training stays on-policy. Flow-GRPO evaluates an EMA of its LoRA weights the same way.
"""
from __future__ import annotations

import contextlib

import torch

from flowgrpo.policies.state import full_tensor


class WeightEMA:
    """shadow <- d * shadow + (1 - d) * weights after every optimizer step, with d = min(decay, (1 + n) / (10 + n))
    at update n, so the average follows the weights closely at the start instead of holding on to the base model."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
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
