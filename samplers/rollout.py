"""Trajectory sampling over the ODE/SDE steps: stochastic where a mask says (every step for Flow-GRPO, a sliding
window for MixGRPO, one step per row for G²RPO's branches: the rollout strategies in `flowgrpo.strategies` choose),
Euler or DPM-Solver++(2M) elsewhere, with the log-prob of every SDE transition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.noise import KeyedNoise
from flowgrpo.samplers.steps import SDE_STEPS, dpm2_step, gaussian_log_prob, ode_step, sde_step

__all__ = ["Trajectory", "check_int", "check_sigmas", "group_noise", "sample_trajectory"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Trajectory:
    """A sampled trajectory; everything the trainer needs to recompute log-probs.

    Attributes:
        latents: ``[B, T + 1, ...]`` x at every sigma (``latents[:, 0]`` is the initial noise, ``[:, -1]`` the sample).
        log_probs: ``[B, T]`` log-prob of each SDE transition; 0 at ODE steps (never NaN).
        sde_mask: ``[T]`` bool (the same for every row) or ``[B, T]`` (per row), True where the step was
            stochastic (the only steps with a log-prob to train on).
        sigmas: ``[T + 1]`` the schedule.
        kind: SDE kind (key of ``SDE_STEPS``) used at the SDE steps.
        noise_level: the SDE noise level used.
        noise_freqs: k > 0 when the SDE noise lived in the k x k lowest DCT frequencies (``steps.band_project``).
        means: ``[B, T, ...]`` the mean of each SDE transition (0 at ODE steps), kept on request: GRPO-Guard
            compares the trained policy's step mean with the sampler's.
    """

    latents: Tensor
    log_probs: Tensor
    sde_mask: Tensor
    sigmas: Tensor
    kind: str
    noise_level: float | Tensor  # one level, or [T] per step
    noise_freqs: int = 0
    means: Tensor | None = None

    @property
    def sigma_max(self) -> float:
        """``sigmas[1]``, the value Flow-GRPO's step clamps 1 - t with at t = 1."""
        return float(self.sigmas[1])


def check_sigmas(sigmas: Tensor) -> None:
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        raise ValueError("sigmas must be a 1-D float tensor of length num_steps + 1 >= 2")
    if sigmas[-1] != 0 or sigmas[0] > 1 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must decrease strictly from at most 1 down to exactly 0")


def sample_trajectory(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    sigmas: Tensor,
    *,
    sde_mask: Tensor,
    kind: str = "flow_sde",
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    noise: KeyedNoise | None = None,
    antithetic: bool = False,
    noise_freqs: int = 0,
    exact_velocity_fn: VelocityFn | None = None,
    ode_solver: str = "euler",
    keep_means: bool = False,
) -> Trajectory:
    """Integrate from ``x_init`` (at ``sigmas[0]``) to ``sigmas[-1] = 0``, stochastic where ``sde_mask``.

    Args:
        velocity_fn: ``(x [B, ...], sigma [B]) -> v`` with v shaped like x (the adapter maps sigma to the
            model's timestep, e.g. with ``timesteps_from_sigmas``).
        x_init: initial latents ``[B, ...]``.
        sigmas: schedule ``[T + 1]``, strictly decreasing to 0.
        sde_mask: bool ``[T]``, or ``[B, T]`` for a per-row choice; True steps take ``sde_step(kind, ...)``,
            False steps the Euler ODE step.
        kind, noise_level: the SDE step (see ``SDE_STEPS``); ``noise_level`` is one value, or one per step ``[T]``
            (a timestep-specific stochasticity, as DenseGRPO calibrates it).
        generator: the randomness as one stream over the batch; or
        noise: per-row keyed noise (``KeyedNoise``), so a row's draws do not depend on the batch it is sampled in.
            Give one of the two when a step is stochastic; rows draw only at their own SDE steps.
        antithetic: rows 2j and 2j+1 take opposite noise (ε, −ε) at every SDE step. Each row is still an
            exact sample of the step's Gaussian, but a pair that shares its state (a G²RPO branch, or shared
            initial noise) then differs only through the direction of its noise, which cancels from the policy
            gradient what the two members have in common. Needs an even batch. (With ``noise`` the pairs are
            given by its keys and signs instead.)
        noise_freqs: k > 0 restricts the SDE noise to the k x k lowest DCT frequencies of each latent channel
            (the layout); the step is the ODE step in every other direction (see ``steps``).
        exact_velocity_fn: the velocity at stochastic steps (default ``velocity_fn``): those are the steps whose
            log-probs training recomputes, so a policy evaluates them exactly as its update does.
        ode_solver: ``euler``, or ``dpm2``: the deterministic steps after the last stochastic one take
            DPM-Solver++(2M) steps (``dpm2_step``, with the x0 predictions of the steps before as history), as
            MixGRPO-Flash integrates the rest of its schedule.
        keep_means: also return the mean of every SDE transition (``Trajectory.means``).

    Raises ValueError if a requested SDE step is deterministic (std 0: noise level 0, or CPS's step to
    sigma 0); leave such steps out of ``sde_mask``.
    """
    check_sigmas(sigmas)
    num_steps = sigmas.numel() - 1
    if not isinstance(x_init, Tensor) or x_init.ndim < 1 or not x_init.is_floating_point():
        raise ValueError("x_init must be a float tensor [B, ...]")
    batch = x_init.shape[0]
    if (not isinstance(sde_mask, Tensor) or sde_mask.dtype != torch.bool
            or sde_mask.shape not in ((num_steps,), (batch, num_steps))):
        raise ValueError(f"sde_mask must be a bool tensor of shape ({num_steps},) or ({batch}, {num_steps})")
    if kind not in SDE_STEPS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {sorted(SDE_STEPS)}")
    rows_sde = sde_mask.expand(batch, num_steps).to(x_init.device)
    stochastic = rows_sde.any(dim=0).tolist()
    if any(stochastic) and (generator is None) == (noise is None):
        raise ValueError("give exactly one of generator= or noise= when sde_mask has stochastic steps")
    if noise is not None and len(noise) != batch:
        raise ValueError(f"noise has {len(noise)} rows for a batch of {batch}")
    if antithetic and batch % 2:
        raise ValueError(f"antithetic noise pairs rows 2j and 2j+1: the batch must be even, got {batch}")

    if ode_solver not in ("euler", "dpm2"):
        raise ValueError(f"ode_solver must be 'euler' or 'dpm2', got {ode_solver!r}")
    levels = step_levels(noise_level, num_steps)
    sigmas_cpu = sigmas.detach().cpu()
    sigma_max = float(sigmas_cpu[1])
    # The std of every kind depends on the sigmas only, so degenerate SDE steps are caught before sampling.
    probe = torch.zeros(())
    for i in (i for i, s in enumerate(stochastic) if s):
        _, std = SDE_STEPS[kind](probe, probe, sigmas_cpu[i], sigmas_cpu[i + 1], levels[i], sigma_max=sigma_max)
        if not bool(std > 0):
            raise ValueError(
                f"step {i} (sigma {float(sigmas_cpu[i]):.4g} -> {float(sigmas_cpu[i + 1]):.4g}) is deterministic "
                f"for kind {kind!r} at noise_level {levels[i]}; remove it from sde_mask"
            )
    last_sde = max((i for i, s in enumerate(stochastic) if s), default=-1)

    sigmas_dev = sigmas.to(x_init.device)
    x = x_init
    latents, log_probs = [x_init], []
    means = torch.zeros((batch, num_steps, *x_init.shape[1:]), dtype=torch.float32, device=x_init.device) \
        if keep_means else None
    prev_x0 = prev_sigma = None  # the multistep solver's history
    for i, is_sde in enumerate(stochastic):
        sigma, sigma_next = sigmas_dev[i], sigmas_dev[i + 1]
        v = (exact_velocity_fn or velocity_fn)(x, sigma.expand(batch)) if is_sde else velocity_fn(x, sigma.expand(batch))
        if is_sde:  # a generator draws for every row, so a row's draw does not depend on the other rows' masks
            eps = None
            if noise is not None:
                shape = (x.shape[1], noise_freqs, noise_freqs) if noise_freqs else x.shape[1:]
                eps = noise(i, shape, rows_sde[:, i], device=x.device)
            x_sde, mean, std = sde_step(kind, x, v, sigma, sigma_next, levels[i], sigma_max=sigma_max,
                                        generator=None if eps is not None else generator, noise=eps,
                                        antithetic=antithetic and eps is None, noise_freqs=noise_freqs)
            log_prob = gaussian_log_prob(x_sde, mean, std, noise_freqs)
            here = rows_sde[:, i]
            if means is not None:
                means[here, i] = mean[here].float()
            if bool(here.all()):
                x_next = x_sde
            else:
                x_ode = ode_step(x, v, sigma, sigma_next)
                x_next = torch.where(here.view(-1, *([1] * (x.ndim - 1))), x_sde, x_ode)
                log_prob = torch.where(here, log_prob, 0.0)
            log_probs.append(log_prob)
        elif ode_solver == "dpm2" and i > last_sde:
            x_next = dpm2_step(x, v, sigma, sigma_next, prev_x0, prev_sigma)
            log_probs.append(x_next.new_zeros(batch))
        else:
            x_next = ode_step(x, v, sigma, sigma_next)
            log_probs.append(x_next.new_zeros(batch))
        if ode_solver == "dpm2":
            prev_x0, prev_sigma = x.float() - sigma * v.float(), sigma
        latents.append(x_next)
        x = x_next

    dtype = latents[-1].dtype  # steps upcast half precision; keep one dtype for the stack
    return Trajectory(
        latents=torch.stack([t.to(dtype) for t in latents], dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sde_mask=sde_mask.clone(),
        sigmas=sigmas.clone(),
        kind=kind,
        noise_level=noise_level.detach().cpu().float() if torch.is_tensor(noise_level) else float(noise_level),
        noise_freqs=noise_freqs,
        means=means,
    )


def step_levels(noise_level: float | Tensor, num_steps: int) -> list[float]:
    """The noise level of each step: one value for all, or ``[T]`` per step."""
    if not torch.is_tensor(noise_level):
        return [float(noise_level)] * num_steps
    if noise_level.shape != (num_steps,):
        raise ValueError(f"noise_level must be a number or [{num_steps}] per step, got shape {tuple(noise_level.shape)}")
    return [float(v) for v in noise_level]


def check_int(name: str, value: int, minimum: int = 1) -> None:
    """ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def group_noise(
    num_groups: int,
    group_size: int,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    shared: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Initial latents ``[num_groups * group_size, *shape]``, group members contiguous.

    With ``shared`` every member of a group starts from the same noise (Flow-GRPO's same-latent option),
    so reward differences inside a group come from the SDE steps alone.
    """
    check_int("num_groups", num_groups)
    check_int("group_size", group_size)
    draws = num_groups if shared else num_groups * group_size
    noise = torch.randn((draws, *shape), generator=generator, dtype=dtype, device=device)
    return noise.repeat_interleave(group_size, dim=0) if shared else noise
