"""Low-frequency SDE noise (``noise_freqs``): the DCT band, the projected step and its log-density."""

import math

import pytest
import torch

from flowgrpo.samplers.rollout import sample_trajectory
from flowgrpo.samplers.schedules import flow_sigmas
from flowgrpo.samplers.steps import (
    SDE_STEPS, band_lift, band_project, ode_step, sde_log_prob, sde_step, transition_mean_std,
)

KINDS = sorted(SDE_STEPS)
LEVEL = {"flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8}


def test_band_coordinates_hand_computed():
    # n = 2: the DCT rows are (1, 1) / sqrt 2 and (1, -1) / sqrt 2, so on [[a, b], [c, d]] the (0, 0) coordinate is
    # (a + b + c + d) / 2 and the (1, 1) coordinate (a - b - c + d) / 2.
    r = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]], dtype=torch.float64)
    z = band_project(r, 2)
    torch.testing.assert_close(z[0, 0], torch.tensor([[5.5, -1.5], [-2.5, 0.5]], dtype=torch.float64))
    # a constant image has only the DC coordinate, value * sqrt(H W)
    z = band_project(torch.full((1, 2, 6, 4), 3.0, dtype=torch.float64), 3)
    torch.testing.assert_close(z[:, :, 0, 0], torch.full((1, 2), 3 * math.sqrt(24), dtype=torch.float64))
    assert z[:, :, 1:].abs().max() < 1e-12 and z[:, :, :, 1:].abs().max() < 1e-12


def test_lift_is_the_orthonormal_inverse_of_project():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(band_project(band_lift(z, (12, 8)), 4), z)
    r = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)  # the full band is an orthogonal transform
    torch.testing.assert_close(band_project(r, 8).square().sum(), r.square().sum())
    torch.testing.assert_close(band_lift(band_project(r, 8), (8, 8)), r)


@pytest.mark.parametrize("kind", KINDS)
def test_full_band_is_the_white_noise_step(kind):
    g = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(3))
    args = (x, v, 0.7, 0.5, LEVEL[kind])
    mean_w, std_w = transition_mean_std(kind, *args, sigma_max=0.9)
    mean_b, std_b = transition_mean_std(kind, *args, sigma_max=0.9, noise_freqs=6)
    torch.testing.assert_close(mean_b, mean_w)
    torch.testing.assert_close(std_b, std_w)
    torch.testing.assert_close(sde_log_prob(kind, x, v, x_next, 0.7, 0.5, LEVEL[kind], sigma_max=0.9, noise_freqs=6),
                               sde_log_prob(kind, x, v, x_next, 0.7, 0.5, LEVEL[kind], sigma_max=0.9))


@pytest.mark.parametrize("kind", KINDS)
def test_band_step_is_euler_outside_the_band_and_its_density_is_the_bands(kind):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    x_next, mean, std = sde_step(kind, x, v, 0.7, 0.5, LEVEL[kind], sigma_max=0.9, noise=noise, noise_freqs=4)
    euler = ode_step(x, v, 0.7, 0.5)
    for d in (x_next - euler, mean - euler):  # everything the step adds to Euler lives in the band
        torch.testing.assert_close(band_lift(band_project(d, 4), (8, 8)), d, rtol=0, atol=1e-5)
    full_mean, _ = SDE_STEPS[kind](x, v, 0.7, 0.5, LEVEL[kind], sigma_max=0.9)
    torch.testing.assert_close(band_project(mean, 4), band_project(full_mean, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(band_project(x_next - mean, 4), std * noise, rtol=0, atol=1e-5)
    # the density of the 3 x 4 x 4 stochastic coordinates, averaged per coordinate
    expected = (-noise.square() / 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    got = sde_log_prob(kind, x, v, x_next, 0.7, 0.5, LEVEL[kind], sigma_max=0.9, noise_freqs=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_band_noise_keeps_the_ode_marginals():
    """x0 ~ N(0, I): x_t = (1 - t) x0 + t eps has variance (1 - t)^2 + t^2 and the exact velocity
    x (2t - 1) / var(t). Integrating the Flow-GRPO SDE with band noise from t = 0.95 to 0.3 must keep that
    variance both inside the band and outside it (where the step is Euler plus nothing)."""
    def var(t):
        return (1 - t) ** 2 + t**2

    g = torch.Generator().manual_seed(3)
    sigmas = torch.linspace(0.95, 0.3, 201, dtype=torch.float64)
    x = torch.randn(4000, 1, 8, 8, generator=g, dtype=torch.float64) * math.sqrt(var(0.95))
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x, _, _ = sde_step("flow_sde", x, x * (2 * s - 1) / var(s), s, s_next, 0.9, sigma_max=0.98, generator=g,
                           noise_freqs=3)
    z = band_project(x, 8)  # orthonormal coordinates of the whole image
    inside, outside = z[:, :, :3, :3], torch.cat([z[:, :, 3:].flatten(1), z[:, :, :3, 3:].flatten(1)], dim=1)
    assert abs(inside.var().item() / var(0.3) - 1) < 0.03
    assert abs(outside.var().item() / var(0.3) - 1) < 0.03
    # the noise does move the band: the draws differ from the deterministic (ODE) path inside it only
    x_ode = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    x_a, _, _ = sde_step("flow_sde", x_ode, x_ode, 0.5, 0.4, 0.9, sigma_max=0.98, noise_freqs=3,
                         generator=torch.Generator().manual_seed(0))
    assert (band_project(x_a - ode_step(x_ode, x_ode, 0.5, 0.4), 8)[:, :, :3, :3]).abs().max() > 1e-3


def test_band_rollout_log_probs_match_recomputation_and_antithetic_pairs():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 2, 8, 8, generator=g).repeat_interleave(2, dim=0)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[1] = True
    sigmas = flow_sigmas({"num_train_timesteps": 1000, "shift": 3.0}, 6)

    def velocity(x, sigma):
        return torch.tanh(x) - x + sigma.view(-1, 1, 1, 1)

    traj = sample_trajectory(velocity, x0, sigmas, sde_mask=mask, noise_level=0.7, generator=g, antithetic=True,
                             noise_freqs=4)
    assert traj.noise_freqs == 4
    x = traj.latents[:, 1]
    lp = sde_log_prob("flow_sde", x, velocity(x, sigmas[1].expand(4)), traj.latents[:, 2], sigmas[1], sigmas[2], 0.7,
                      sigma_max=traj.sigma_max, noise_freqs=4)
    torch.testing.assert_close(lp, traj.log_probs[:, 1], rtol=0, atol=1e-6)
    mean, _ = transition_mean_std("flow_sde", x, velocity(x, sigmas[1].expand(4)), sigmas[1], sigmas[2], 0.7,
                                  sigma_max=traj.sigma_max, noise_freqs=4)
    d = traj.latents[:, 2] - mean
    torch.testing.assert_close(d[1::2], -d[0::2], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("shape", "k", "match"), [
    ((2, 8, 8), 2, r"needs latents \[B, C, H, W\]"),
    ((2, 3, 8, 4), 5, "exceeds the latent size"),
    ((2, 3, 8, 8), -1, "positive int"),
    ((2, 3, 8, 8), True, "positive int"),
])
def test_band_bad_input(shape, k, match):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        sde_step("flow_sde", x, x, 0.7, 0.5, 0.7, sigma_max=0.9, generator=torch.Generator(), noise_freqs=k)
    with pytest.raises(ValueError, match=r"band coordinates must be \[B, C, k, k\]"):
        band_lift(torch.zeros(2, 3, 4), (8, 8))
    with pytest.raises(ValueError, match="must have shape"):
        sde_step("flow_sde", torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), 0.7, 0.5, 0.7, sigma_max=0.9,
                 noise=torch.zeros(2, 3, 8, 8), noise_freqs=2)
