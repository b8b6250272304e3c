"""MixGRPO: SDE only inside a window of steps that slides along the schedule as training goes, ODE elsewhere.

The window (``sde_steps`` wide) starts at step 0 and moves ``window_stride`` steps later every
``window_shift_every`` iterations, within the first ``window_end`` steps (MixGRPO's timestep fraction, 60% of the
schedule by default), then starts again at 0 (MixGRPO's roll-back). Its position is a function of the iteration
count, which the training state holds, so a resumed run continues at the same position. Only the window's steps
train. MixGRPO-Flash: ``ode_solver: dpm2`` integrates the steps after the window with DPM-Solver++(2M), on
``ode_compress`` of the remaining schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.rollout import check_int, check_sigmas
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, option

ODE_SOLVERS = ("euler", "dpm2")


@dataclass(frozen=True)
class MixGRPOOptions:
    window_shift_every: int = option(25, "iterations before the SDE window moves on (MixGRPO's shift interval)")
    window_stride: int = option(1, "steps the window moves each time")
    window_end: int = option(0, "the window moves within the first n steps, then starts again at step 0 (0 = 60% of "
                                "num_steps, MixGRPO's timestep fraction)")
    ode_solver: str = option("euler", "the ODE steps after the window: euler, or dpm2 = DPM-Solver++(2M) "
                                      "(MixGRPO-Flash)")
    ode_compress: float = option(1.0, "integrate the steps after the window on this fraction of them "
                                      "(MixGRPO-Flash: 0.4); 1 = all")


def mixgrpo_window(
    step: int, num_steps: int, window: int, shift_every: int, *, start: int = 0, end: int | None = None,
    stride: int = 1,
) -> Tensor:
    """MixGRPO sliding window: bool ``[num_steps]``, True (SDE) on ``[s, s + window)``, ODE elsewhere.

    The window begins at ``start`` and moves ``stride`` steps later every ``shift_every`` training iterations
    (``step`` counts them from 0); once it would pass ``end`` (exclusive, default ``num_steps``) it wraps
    back to ``start`` (MixGRPO's roll-back). The window always fits whole inside ``[start, end)``.
    """
    check_int("step", step, minimum=0)
    check_int("num_steps", num_steps)
    check_int("window", window)
    check_int("shift_every", shift_every)
    check_int("stride", stride)
    check_int("start", start, minimum=0)
    end = num_steps if end is None else end
    check_int("end", end)
    if end > num_steps or start + window > end:
        raise ValueError(f"need start + window <= end <= num_steps, got {start} + {window}, {end}, {num_steps}")
    positions = (end - window - start) // stride + 1
    first = start + (step // shift_every) % positions * stride
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[first : first + window] = True
    return mask


def compressed_tail(sigmas: Tensor, end: int, fraction: float) -> Tensor:
    """MixGRPO-Flash's schedule: ``sigmas`` up to step ``end`` (the end of the SDE window), then the rest of the way
    to 0 on ``max(int(fraction x remaining steps), 1)`` of its own points, evenly spaced by index (so the model's
    time shift is kept). ``fraction`` = 1 returns ``sigmas``."""
    check_sigmas(sigmas)
    num_steps = sigmas.numel() - 1
    if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end < num_steps:
        raise ValueError(f"end must be an int in [0, {num_steps}), got {end!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    remaining = num_steps - end
    steps = max(int(remaining * fraction), 1)
    picks = torch.linspace(0, remaining, steps + 1).round().long().unique()
    return torch.cat([sigmas[:end], sigmas[end:][picks]])


class MixGRPO(FlowStrategy):
    """MixGRPO: SDE only in a window of sde_steps that slides along the schedule as training goes, ODE elsewhere;
    only the window trains."""

    name = "mixgrpo"
    Options = MixGRPOOptions

    @classmethod
    def check(cls, options: MixGRPOOptions, sampling: Sampling, run: RunContext) -> None:
        for name in ("window_shift_every", "window_stride"):
            if getattr(options, name) < 1:
                raise ValueError(f"mixgrpo.{name} must be >= 1, got {getattr(options, name)}")
        if options.window_end < 0:
            raise ValueError(f"mixgrpo.window_end must be >= 0, got {options.window_end}")
        if options.window_end and not (sampling.sde_steps or 1) <= options.window_end <= sampling.num_steps:
            raise ValueError(f"mixgrpo.window_end={options.window_end} must hold the window (sde_steps="
                             f"{sampling.sde_steps}) and fit in num_steps={sampling.num_steps}")
        if options.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"mixgrpo.ode_solver {options.ode_solver!r} is not one of {ODE_SOLVERS}")
        if not 0 < options.ode_compress <= 1:
            raise ValueError(f"mixgrpo.ode_compress must be in (0, 1], got {options.ode_compress}")

    def __init__(self, policy, options: MixGRPOOptions, sampling: Sampling, scoring):
        super().__init__(policy, options, sampling, scoring)
        self.width = min(sampling.sde_steps or 1, self.usable)
        self.end = min(options.window_end or max(self.width, round(0.6 * sampling.num_steps)), self.usable)
        self.ode_solver = options.ode_solver

    def window_start(self, iteration: int) -> int:
        mask = mixgrpo_window(iteration, self.sampling.num_steps, self.width, self.options.window_shift_every,
                              end=self.end, stride=self.options.window_stride)
        return int(mask.nonzero()[0])

    def schedule(self, plan) -> Tensor:
        """The model's schedule, compressed after the window for MixGRPO-Flash."""
        sigmas = super().schedule(plan)
        after = self.window_start(plan.iteration) + self.width
        if self.options.ode_compress < 1 and after < len(sigmas) - 1:
            sigmas = compressed_tail(sigmas, after, self.options.ode_compress)
        return sigmas

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        start = self.window_start(plan.iteration)
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[start : start + self.width] = True
        return mask

    def metrics(self, ro, rewards: Tensor, plan) -> dict[str, float]:
        return {"window_start": float(self.window_start(plan.iteration))}
