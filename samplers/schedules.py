"""Sigma schedules for flow-matching models, computed from the model's own scheduler config.

`flow_sigmas` reproduces, bit for bit, the `sigmas` that diffusers'
`FlowMatchEulerDiscreteScheduler.from_config(cfg).set_timesteps(num_steps, mu=mu)` produces, without
building a stateful scheduler. The arithmetic deliberately follows diffusers' order of operations and
precision (float32 for the training-grid endpoints, float64 numpy for the inference grid, float32
result) because a last-bit difference in a sigma changes every later latent of a trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["calculate_shift", "flow_sigmas", "offset_schedule", "timesteps_from_sigmas"]

_EULER = "FlowMatchEulerDiscreteScheduler"
_DPM = "DPMSolverMultistepScheduler"

# FlowMatchEulerDiscreteScheduler.__init__ defaults (what from_config fills in for missing keys).
_EULER_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    # Changes `step()`, not the schedule; our samplers replace `step()` anyway.
    "stochastic_sampling": False,
}
# Keys that would change the schedule in a way this module does not reproduce.
_UNSUPPORTED_FLAGS = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift `mu`: linear in the number of image tokens, as diffusers' pipelines compute it."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def _euler_config(scheduler_config: Mapping) -> dict:
    """Validate a scheduler config and return the FlowMatchEuler settings it stands for."""
    if not isinstance(scheduler_config, Mapping):
        raise ValueError(f"scheduler_config must be a dict, got {type(scheduler_config).__name__}")
    cls = scheduler_config.get("_class_name", _EULER)
    public = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if cls == _DPM:
        # Sana ships a DPM-Solver config whose `flow_shift` is the flow-matching shift. diffusers'
        # FlowMatchEuler.from_config would silently drop `flow_shift` (shift 1.0, the wrong schedule),
        # so we translate it to the Euler settings the model was trained with instead.
        if not public.get("use_flow_sigmas", False):
            raise ValueError(f"{_DPM} config without use_flow_sigmas=True is not a flow-matching schedule")
        cfg = dict(_EULER_DEFAULTS)
        cfg["num_train_timesteps"] = public.get("num_train_timesteps", 1000)
        cfg["shift"] = public.get("flow_shift", 1.0)
        cfg["use_dynamic_shifting"] = public.get("use_dynamic_shifting", False)
        cfg["time_shift_type"] = public.get("time_shift_type", "exponential")
        return cfg
    if cls != _EULER:
        raise ValueError(f"unsupported scheduler {cls!r}: flow_sigmas reproduces {_EULER} (or a {_DPM} flow config)")
    unknown = sorted(set(public) - set(_EULER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown {_EULER} config key(s) {unknown}; refusing to guess how they change the schedule")
    cfg = {**_EULER_DEFAULTS, **public}
    enabled = [k for k in _UNSUPPORTED_FLAGS if cfg[k]]
    if enabled:
        raise ValueError(f"scheduler options {enabled} are not supported by flow_sigmas")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {cfg['time_shift_type']!r}")
    n_train = cfg["num_train_timesteps"]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {n_train!r}")
    if not cfg["use_dynamic_shifting"] and not cfg["shift"] > 0:
        raise ValueError(f"shift must be > 0, got {cfg['shift']!r}")
    return cfg


def _time_shift(cfg: dict, mu: float, t: np.ndarray) -> np.ndarray:
    # diffusers' time_shift with its `sigma` exponent fixed to 1.0, as set_timesteps uses it.
    if cfg["time_shift_type"] == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_sigmas(
    scheduler_config: Mapping,
    num_steps: int,
    *,
    image_seq_len: int | None = None,
    base_sigmas: Sequence[float] | Tensor | np.ndarray | None = None,
) -> Tensor:
    """Sigmas (float32, length ``num_steps + 1``, decreasing, ending at 0) of a flow-matching schedule.

    Equals ``FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).set_timesteps(num_steps, mu=mu,
    sigmas=base_sigmas).sigmas`` where, with ``use_dynamic_shifting``, ``mu = calculate_shift(image_seq_len,
    base_image_seq_len, max_image_seq_len, base_shift, max_shift)`` from the config, as the pipelines do.

    Args:
        scheduler_config: the model's scheduler config dict. A Sana-style DPM-Solver config with
            ``use_flow_sigmas`` is read as the Euler schedule with ``shift = flow_shift``.
        num_steps: number of sampling steps (>= 1).
        image_seq_len: number of image tokens (latent patches); required with dynamic shifting,
            ignored otherwise.
        base_sigmas: optional unshifted sigmas, like ``set_timesteps(sigmas=...)``. FluxPipeline passes
            ``np.linspace(1.0, 1 / num_steps, num_steps)`` here; without it the scheduler's own grid is used.
    """
    cfg = _euler_config(scheduler_config)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    n_train = cfg["num_train_timesteps"]

    mu = None
    if cfg["use_dynamic_shifting"]:
        if image_seq_len is None:
            raise ValueError("the scheduler uses dynamic shifting: pass image_seq_len (number of image tokens)")
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
        mu = calculate_shift(
            image_seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )

    if base_sigmas is None:
        # Endpoints of the training grid, in float32 exactly as the scheduler's __init__ computes them
        # (static shift already applied there, and applied again below: that is diffusers' behaviour).
        ends = torch.tensor([n_train, 1.0], dtype=torch.float32) / n_train
        if not cfg["use_dynamic_shifting"]:
            ends = cfg["shift"] * ends / (1 + (cfg["shift"] - 1) * ends)
        sigma_max, sigma_min = ends[0].item(), ends[1].item()
        sigmas = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        sigmas = np.asarray(base_sigmas.cpu() if isinstance(base_sigmas, Tensor) else base_sigmas).astype(np.float32)
        if sigmas.shape != (num_steps,):
            raise ValueError(f"base_sigmas must have shape ({num_steps},), got {sigmas.shape}")
        if not (np.all(sigmas > 0) and np.all(sigmas <= 1)):
            raise ValueError("base_sigmas must lie in (0, 1]")

    if mu is not None:
        sigmas = _time_shift(cfg, mu, sigmas)
    else:
        sigmas = cfg["shift"] * sigmas / (1 + (cfg["shift"] - 1) * sigmas)
    if cfg["shift_terminal"]:
        # Stretch so the last sampled sigma lands on shift_terminal (LTX-Video).
        one_minus = 1 - sigmas
        if one_minus[-1] == 0:
            raise ValueError("shift_terminal needs a schedule whose last sigma is below 1 (use num_steps >= 2)")
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))

    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def offset_schedule(fine: Tensor, num_steps: int, offset: int) -> Tensor:
    """A `num_steps` schedule whose interior sigmas are those of a finer grid shifted by `offset` fine steps.

    `fine` is the model's own grid at ``num_steps * m`` steps (``m * num_steps + 1`` values ending at 0). The result
    starts at ``fine[0]`` (where the initial noise lives), ends at 0 and steps through ``fine[(k - 1) * m + offset]``
    for k = 1 .. num_steps - 1, so its first step is ``offset`` fine steps long and the others m (the last one
    ``2m - offset``). Training rollouts on random offsets visit every noise level of the fine grid instead of only
    the points of one grid, so what the model learns there also holds for samplers with other step counts.
    """
    m, rem = divmod(len(fine) - 1, num_steps)
    if rem or m < 1 or float(fine[-1]) != 0:
        raise ValueError(f"fine must be a grid of num_steps x m steps ending at 0; got {len(fine)} values for "
                         f"num_steps={num_steps}")
    if not 1 <= offset <= m:
        raise ValueError(f"offset must be in [1, {m}], got {offset}")
    idx = [0] + [(k - 1) * m + offset for k in range(1, num_steps)] + [num_steps * m]
    return fine[torch.tensor(idx)]


def timesteps_from_sigmas(sigmas: Tensor, num_train_timesteps: int) -> Tensor:
    """Model timesteps for the given sigmas: ``sigma * num_train_timesteps`` (diffusers' convention).

    Pass ``sigmas[:-1]`` to get the scheduler's ``timesteps`` (one per sampling step).
    """
    if not isinstance(sigmas, Tensor) or not sigmas.is_floating_point():
        raise ValueError("sigmas must be a floating-point tensor")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    return sigmas * num_train_timesteps
