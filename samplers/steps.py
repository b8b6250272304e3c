"""One sampling step of a flow-matching model: the ODE (Euler) step and the SDE steps GRPO explores with.

Convention: x_t = (1 - t) x0 + t eps, the model predicts v ~ eps - x0, sampling runs t (= sigma) from 1
to 0, so dt = sigma_next - sigma < 0. Each SDE kind is a Gaussian transition
x_next ~ N(mean, std^2) given by a pure ``mean_std`` function; at noise level 0 every kind reduces to
the Euler step. ``gaussian_log_prob`` is the one log-density used both when sampling and when the
trainer recomputes log-probs from stored (x, x_next) pairs.

``sigma`` / ``sigma_next`` may be Python floats, 0-d tensors or per-sample ``[B]`` tensors. Maths runs in
x's dtype, upcast to at least float32 (bf16 overflows in the mean), like Flow-GRPO.

Low-frequency noise (``noise_freqs = k > 0``, latents ``[B, C, H, W]``): the step's noise is restricted to the
span of the k x k lowest 2-D DCT frequencies of each channel, where an image's layout lives. The step is then
stochastic in those k*k*C coordinates and the Euler (ODE) step in every other direction; the SDE's drift
correction is projected onto the same span, which keeps the ODE's marginals (with diffusion matrix g^2 P the
Fokker-Planck correction is (g^2 / 2) P grad log p). The log-density is that of the k*k*C stochastic coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SDE_STEPS",
    "band_lift",
    "band_project",
    "cps_mean_std",
    "dance_sde_mean_std",
    "dpm2_step",
    "flow_sde_mean_std",
    "gaussian_log_prob",
    "ode_step",
    "sde_log_prob",
    "sde_step",
    "transition_mean_std",
]

MeanStd = Callable[..., tuple[Tensor, Tensor]]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _prepare(x: Tensor, v: Tensor, sigma, sigma_next) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upcast x, v and shape the sigmas so they broadcast against x (``[B]`` -> ``[B, 1, ...]``)."""
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
    x, v = x.to(dtype), v.to(dtype)

    def column(s) -> Tensor:
        s = torch.as_tensor(s, dtype=dtype, device=x.device)
        if s.ndim == 0:
            return s
        if s.ndim == 1 and x.ndim >= 1 and s.shape[0] == x.shape[0]:
            return s.view(-1, *([1] * (x.ndim - 1)))
        raise ValueError(f"sigma must be a scalar or a [B] tensor with B={x.shape[0] if x.ndim else 0}, got {tuple(s.shape)}")

    return x, v, column(sigma), column(sigma_next)


def _check_noise_level(noise_level: float, upper: float | None = None) -> float:
    level = float(noise_level)
    if not (level >= 0 and math.isfinite(level)) or (upper is not None and level > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0 and finite"
        raise ValueError(f"noise_level must be {bound}, got {noise_level!r}")
    return level


def ode_step(x: Tensor, v: Tensor, sigma, sigma_next) -> Tensor:
    """Euler step of the probability-flow ODE: ``x + v * (sigma_next - sigma)``."""
    x, v, s, s_next = _prepare(x, v, sigma, sigma_next)
    return x + (s_next - s) * v


def dpm2_step(x: Tensor, v: Tensor, sigma, sigma_next, prev_x0: Tensor | None, prev_sigma) -> Tensor:
    """DPM-Solver++(2M) step of the flow ODE (MixGRPO-Flash's solver after the SDE window), in data prediction:
    x0 = x - sigma v, alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_next - lambda;
    x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r)), r = h_prev / h.
    The first-order part is exactly the Euler step; without a previous x0 (``prev_x0`` None) or at the final step
    (sigma_next = 0, where diffusers' solver also drops to first order) it is the Euler step."""
    if prev_x0 is None or float(sigma_next) == 0:
        return ode_step(x, v, sigma, sigma_next)
    x, v, s, s_next = _prepare(x, v, sigma, sigma_next)
    x0 = x - s * v
    lam = lambda t: torch.log((1 - t) / t)  # noqa: E731
    s_prev = torch.as_tensor(prev_sigma, dtype=x.dtype, device=x.device)
    h, h_prev = lam(s_next) - lam(s), lam(s) - lam(s_prev)
    d1 = (x0 - prev_x0.to(x.dtype)) * (h / h_prev)
    return s_next / s * x - (1 - s_next) * torch.expm1(-h) * (x0 + 0.5 * d1)


def _drift_mean(x: Tensor, v: Tensor, s: Tensor, dt: Tensor, sigma_t: Tensor) -> Tensor:
    # Euler-Maruyama mean of the reverse SDE with diffusion sigma_t whose marginals match the ODE's:
    # the score of x_t is -(x + (1 - t) v) / t, folded into the x and v coefficients.
    return x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt


def flow_sde_mean_std(
    x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, *, sigma_max: float
) -> tuple[Tensor, Tensor]:
    """Flow-GRPO SDE step: sigma_t = a * sqrt(t / (1 - t)), std = sigma_t * sqrt(-dt).

    At t = 1 the denominator 1 - t is replaced by ``1 - sigma_max`` (pass ``sigma_max = sigmas[1]``),
    Flow-GRPO's clamp; then the first step's std is exactly ``a * sqrt(-dt / (1 - sigma_max))``.
    Needs sigma in (0, 1]; the last step (sigma_next = 0) is well defined.
    """
    level = _check_noise_level(noise_level)
    sigma_max = float(sigma_max)
    if not 0 <= sigma_max < 1:
        raise ValueError(f"sigma_max (sigmas[1]) must be in [0, 1), got {sigma_max}")
    x, v, s, s_next = _prepare(x, v, sigma, sigma_next)
    dt = s_next - s
    one_minus = 1 - torch.where(s == 1, torch.full_like(s, sigma_max), s)
    sigma_t = level * torch.sqrt(s / one_minus)
    return _drift_mean(x, v, s, dt, sigma_t), sigma_t * torch.sqrt(-dt)


def dance_sde_mean_std(
    x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, *, sigma_max: float | None = None
) -> tuple[Tensor, Tensor]:
    """DanceGRPO SDE step: the Flow-GRPO mean with a constant sigma_t = eta (``noise_level``).

    ``sigma_max`` is accepted for a uniform signature and unused.
    """
    level = _check_noise_level(noise_level)
    x, v, s, s_next = _prepare(x, v, sigma, sigma_next)
    dt = s_next - s
    sigma_t = torch.full_like(s, level)
    return _drift_mean(x, v, s, dt, sigma_t), sigma_t * torch.sqrt(-dt)


def cps_mean_std(
    x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, *, sigma_max: float | None = None
) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving step (Flow-CPS, Flow-GRPO's ``sde_type="cps"``).

    Re-noises the predicted endpoints so x_next keeps the forward process's coefficients at sigma_next:
    std = sigma_next * sin(noise_level * pi / 2), mean = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2)
    with x0_hat = x - sigma v and x1_hat = x + (1 - sigma) v. noise_level must be in [0, 1]; the step to
    sigma_next = 0 has std 0 (deterministic). ``sigma_max`` is unused.
    """
    level = _check_noise_level(noise_level, upper=1.0)
    x, v, s, s_next = _prepare(x, v, sigma, sigma_next)
    std = s_next * math.sin(level * math.pi / 2)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = x0_hat * (1 - s_next) + x1_hat * torch.sqrt((s_next**2 - std**2).clamp_min(0))
    return mean, std


SDE_STEPS: dict[str, MeanStd] = {
    "flow_sde": flow_sde_mean_std,
    "dance_sde": dance_sde_mean_std,
    "cps": cps_mean_std,
}


def _mean_std_fn(kind: str) -> MeanStd:
    try:
        return SDE_STEPS[kind]
    except KeyError:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {sorted(SDE_STEPS)}") from None


def _dct_rows(n: int, k: int, dtype: torch.dtype, device) -> Tensor:
    """The k lowest-frequency rows of the orthonormal DCT-II matrix of size n, ``[k, n]``."""
    pos = torch.arange(n, dtype=torch.float64)
    freq = torch.arange(k, dtype=torch.float64)[:, None]
    rows = torch.cos(math.pi * (pos + 0.5) * freq / n) * math.sqrt(2 / n)
    rows[0] /= math.sqrt(2)
    return rows.to(dtype=dtype, device=device)


def _check_band(shape: torch.Size, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"noise_freqs must be a positive int, got {k!r}")
    if len(shape) != 4:
        raise ValueError(f"low-frequency noise needs latents [B, C, H, W], got shape {tuple(shape)}")
    if k > min(shape[-2:]):
        raise ValueError(f"noise_freqs={k} exceeds the latent size {tuple(shape[-2:])}")


def band_project(r: Tensor, k: int) -> Tensor:
    """Coordinates of ``r [B, C, H, W]`` on the k x k lowest DCT frequencies of each channel, ``[B, C, k, k]``."""
    _check_band(r.shape, k)
    dh, dw = _dct_rows(r.shape[-2], k, r.dtype, r.device), _dct_rows(r.shape[-1], k, r.dtype, r.device)
    return dh @ r @ dw.T


def band_lift(z: Tensor, size: tuple[int, int]) -> Tensor:
    """The image ``[B, C, H, W]`` of coordinates ``z [B, C, k, k]``; ``band_project(band_lift(z)) == z``."""
    k = z.shape[-1]
    if z.ndim != 4 or z.shape[-2] != k:
        raise ValueError(f"band coordinates must be [B, C, k, k], got shape {tuple(z.shape)}")
    _check_band(torch.Size((*z.shape[:2], *size)), k)
    dh, dw = _dct_rows(size[0], k, z.dtype, z.device), _dct_rows(size[1], k, z.dtype, z.device)
    return dh.T @ z @ dw


def transition_mean_std(kind: str, x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, *,
                        sigma_max: float, noise_freqs: int = 0) -> tuple[Tensor, Tensor]:
    """Mean and std of the SDE step ``kind``; with ``noise_freqs`` the mean is the Euler step plus the
    kind's correction projected onto the low-frequency band (the directions the noise lives in)."""
    mean, std = _mean_std_fn(kind)(x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max)
    if noise_freqs:
        euler = ode_step(x, v, sigma, sigma_next)
        mean = euler + band_lift(band_project(mean - euler, noise_freqs), tuple(x.shape[-2:]))
    return mean, std


def sde_step(
    kind: str,
    x: Tensor,
    v: Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    *,
    sigma_max: float,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    antithetic: bool = False,
    noise_freqs: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One SDE step ``x_next = mean + std * noise``; returns ``(x_next, mean, std)``.

    Give exactly one source of randomness: ``noise`` or ``generator`` (standard normal drawn in the step's
    compute dtype on x's device; with ``antithetic`` rows 2j+1 take the opposite of row 2j's draw). The noise
    has x's shape, or ``[B, C, k, k]`` band coordinates with ``noise_freqs = k`` (lifted to the image).
    """
    mean, std = transition_mean_std(kind, x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max,
                                    noise_freqs=noise_freqs)
    shape = (*mean.shape[:2], noise_freqs, noise_freqs) if noise_freqs else mean.shape
    if (noise is None) == (generator is None):
        raise ValueError("pass exactly one of generator= or noise=")
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=mean.dtype, device=mean.device)
        if antithetic:
            noise[1::2] = -noise[0::2]
    elif noise.shape != shape:
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    noise = noise.to(mean.dtype)
    if noise_freqs:
        noise = band_lift(noise, tuple(mean.shape[-2:]))
    return mean + std * noise, mean, std


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float, noise_freqs: int = 0) -> Tensor:
    """log N(x_next; mean, std^2) averaged over all non-batch elements -> ``[B]``; with ``noise_freqs`` over the
    band coordinates of ``x_next - mean`` (the step's stochastic coordinates) instead.

    ``std`` is a scalar or broadcasts to x_next's shape (e.g. ``[B, 1, ...]``). A zero std (noise level 0,
    or the CPS step to sigma 0) is a deterministic step without a density: that raises ValueError
    rather than returning inf/NaN; treat such steps as ODE steps.
    """
    if x_next.shape != mean.shape:
        raise ValueError(f"x_next and mean must have the same shape, got {tuple(x_next.shape)} and {tuple(mean.shape)}")
    if x_next.ndim < 1:
        raise ValueError("x_next needs a batch dimension")
    dtype = torch.promote_types(torch.promote_types(x_next.dtype, mean.dtype), torch.float32)
    std = torch.as_tensor(std, dtype=dtype, device=x_next.device)
    try:
        fits = torch.broadcast_shapes(std.shape, x_next.shape) == x_next.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"std of shape {tuple(std.shape)} does not broadcast to {tuple(x_next.shape)}")
    if not bool((std > 0).all()):
        raise ValueError("std must be > 0: a zero-std step is deterministic and has no log-density")
    diff = x_next.to(dtype) - mean.to(dtype)
    if noise_freqs:
        diff = band_project(diff, noise_freqs)
    log_prob = -(diff**2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, x_next.ndim))) if x_next.ndim > 1 else log_prob


def sde_log_prob(
    kind: str,
    x: Tensor,
    v: Tensor,
    x_next: Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    *,
    sigma_max: float,
    noise_freqs: int = 0,
) -> Tensor:
    """Log-prob ``[B]`` of a stored transition x -> x_next under the step the velocity ``v`` implies.

    This is what the trainer calls with the current policy's v; with the sampling-time v it returns
    the log-probs recorded at sampling.
    """
    mean, std = transition_mean_std(kind, x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max,
                                    noise_freqs=noise_freqs)
    return gaussian_log_prob(x_next, mean, std, noise_freqs)
