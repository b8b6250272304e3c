"""MixGRPO: SDE only inside a window of steps that slides along the schedule as training goes, ODE elsewhere.

As its code does it (Tencent-Hunyuan/MixGRPO, fastvideo/utils/grpo_states.py, progressive with overlap): the window
(``sde_steps`` wide) starts at step 0 and moves ``window_stride`` steps later every ``window_shift_every``
iterations; its steps stop at ``window_end`` (the reference's max timestep index, num_steps - 2, by default), so near
the end it is truncated to fewer steps, and once its start would pass the end it rolls back to 0. The reference
also spends one shift interval on the empty window at the end, which trains nothing; that position is skipped here.
``whole_window`` keeps the window whole and rolls back as soon as it would not fit. Its position is a function of the
iteration count, which the training state holds, so a resumed run continues at the same position. Only the window's
steps train. MixGRPO-Flash: ``ode_solver: dpm2`` integrates the steps after the window with DPM-Solver++(2M) on
fewer steps (``ode_compress``), re-spaced as the reference rebuilds its schedule (fastvideo/utils/sampling_utils.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.rollout import check_int
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, option

ODE_SOLVERS = ("euler", "dpm2")


@dataclass(frozen=True)
class MixGRPOOptions:
    window_shift_every: int = option(25, "iterations before the SDE window moves on (MixGRPO's shift interval)")
    window_stride: int = option(1, "steps the window moves each time")
    window_end: int = option(0, "the window's steps stop before step n, then it starts again at step 0 (0 = "
                                "num_steps - 2, the reference's max timestep index)")
    whole_window: bool = option(False, "keep the window whole: roll back once it would pass window_end (the "
                                       "reference truncates it there)")
    ode_solver: str = option("euler", "the ODE steps after the window: euler, or dpm2 = DPM-Solver++(2M) "
                                      "(MixGRPO-Flash)")
    ode_compress: float = option(1.0, "integrate the steps after the window on this fraction of them "
                                      "(MixGRPO-Flash: 0.4); 1 = all")


def mixgrpo_window(
    step: int, num_steps: int, window: int, shift_every: int, *, start: int = 0, end: int | None = None,
    stride: int = 1, whole: bool = False,
) -> Tensor:
    """MixGRPO sliding window: bool ``[num_steps]``, True (SDE) on ``[s, min(s + window, end))``, ODE elsewhere.

    The window begins at ``start`` and moves ``stride`` steps later every ``shift_every`` training iterations
    (``step`` counts them from 0), truncated at ``end`` (exclusive, default ``num_steps``); after its last position
    with a step before ``end`` it rolls back to ``start``. ``whole``: only positions where the whole window fits.
    """
    check_int("step", step, minimum=0)
    check_int("num_steps", num_steps)
    check_int("window", window)
    check_int("shift_every", shift_every)
    check_int("stride", stride)
    check_int("start", start, minimum=0)
    end = num_steps if end is None else end
    check_int("end", end)
    if window > num_steps or end > num_steps or start + (window if whole else 1) > end:
        raise ValueError(f"need start + {'window' if whole else '1'} <= end <= num_steps, got start {start}, window "
                         f"{window}, end {end}, num_steps {num_steps}")
    positions = ((end - window if whole else end - 1) - start) // stride + 1
    first = start + (step // shift_every) % positions * stride
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[first : min(first + window, end)] = True
    return mask


def compressed_tail(grid: Callable[[int], Tensor], num_steps: int, end: int, fraction: float) -> Tensor:
    """MixGRPO-Flash's schedule: the model's ``num_steps`` grid up to step ``end`` (the first step after the SDE
    window), then K = int((num_steps - end + 1) x fraction) - 1 steps to 0, evenly spaced in the grid's unshifted
    time and shifted as the grid is: the reference's ``linspace(t_end, 0, K + 1)`` through its time shift. ``grid(n)``
    gives the model's n-step sigmas; the points are read exactly on its (num_steps x K)-step grid. Where K would be 0
    the reference's schedule stops short of sigma 0 (``linspace(t, 0, 1) = [t]``); here one step finishes it."""
    check_int("num_steps", num_steps)
    if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end < num_steps:
        raise ValueError(f"end must be an int in [0, {num_steps}), got {end!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    steps = max(int(max((num_steps - end + 1) * fraction, 1)) - 1, 1)
    fine = grid(num_steps * steps)
    picks = end * steps + torch.arange(steps + 1) * (num_steps - end)
    return torch.cat([grid(num_steps)[:end], fine[picks]])


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
        need = (sampling.sde_steps or 1) if options.whole_window else 1
        if options.window_end and not need <= options.window_end <= sampling.num_steps:
            raise ValueError(f"mixgrpo.window_end={options.window_end} must hold {'the' if options.whole_window else 'a'}"
                             f" window (sde_steps={sampling.sde_steps}) and fit in num_steps={sampling.num_steps}")
        if options.ode_compress < 1 and sampling.schedule_jitter:
            raise ValueError("mixgrpo.ode_compress re-spaces the model's own grid; it cannot follow schedule_jitter")
        if sampling.num_steps < 3 and not options.window_end:
            raise ValueError("mixgrpo's default window_end is num_steps - 2: it needs num_steps >= 3")
        if options.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"mixgrpo.ode_solver {options.ode_solver!r} is not one of {ODE_SOLVERS}")
        if not 0 < options.ode_compress <= 1:
            raise ValueError(f"mixgrpo.ode_compress must be in (0, 1], got {options.ode_compress}")

    def __init__(self, policy, options: MixGRPOOptions, sampling: Sampling, scoring):
        super().__init__(policy, options, sampling, scoring)
        self.width = min(sampling.sde_steps or 1, self.usable)
        self.end = min(options.window_end or sampling.num_steps - 2, self.usable)
        self.ode_solver = options.ode_solver

    def window(self, iteration: int) -> Tensor:
        """[num_steps] bool: the iteration's SDE window."""
        return mixgrpo_window(iteration, self.sampling.num_steps, self.width, self.options.window_shift_every,
                              end=self.end, stride=self.options.window_stride, whole=self.options.whole_window)

    def schedule(self, plan) -> Tensor:
        """The model's schedule, compressed after the window for MixGRPO-Flash."""
        sigmas = super().schedule(plan)
        after = int(self.window(plan.iteration).nonzero()[-1]) + 1
        if self.options.ode_compress < 1 and after < len(sigmas) - 1:
            sigmas = compressed_tail(self.policy.sigmas, self.sampling.num_steps, after, self.options.ode_compress)
        return sigmas

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        return self.window(plan.iteration)[:num_steps].clone()  # a compressed schedule only shortens the tail

    def metrics(self, ro, rewards: Tensor, plan) -> dict[str, float]:
        window = self.window(plan.iteration).nonzero().flatten()
        return {"window_start": float(window[0]), "window_steps": float(len(window))}
