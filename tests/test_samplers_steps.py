"""ODE/SDE steps: diffusers' Euler step as the noise-0 reference, hand-computed values, sampling statistics."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo.samplers.schedules import calculate_shift, flow_sigmas
from flowgrpo.samplers.steps import (
    SDE_STEPS,
    cps_mean_std,
    dance_sde_mean_std,
    flow_sde_mean_std,
    gaussian_log_prob,
    ode_step,
    sde_log_prob,
    sde_step,
)

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
KINDS = sorted(SDE_STEPS)


def _linear_velocity(seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    b = torch.randn(dim, generator=g)
    return lambda x, sigma: x @ w + sigma.view(-1, *([1] * (x.ndim - 1))) * b


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cfg", "n", "seq_len"), [(SD3, 10, None), (FLUX, 8, 1024)])
def test_noise_level_zero_equals_diffusers_euler_over_full_schedule(kind, cfg, n, seq_len):
    velocity = _linear_velocity()
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(n, mu=calculate_shift(seq_len) if seq_len else None)
    sigmas = flow_sigmas(cfg, n, image_seq_len=seq_len)
    assert torch.equal(sigmas, sched.sigmas)
    x_ref = x_ode = x_sde = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for i, t in enumerate(sched.timesteps):
        sig = sigmas[i].expand(3)
        x_ref = sched.step(velocity(x_ref, sig), t, x_ref).prev_sample
        x_ode = ode_step(x_ode, velocity(x_ode, sig), sigmas[i], sigmas[i + 1])
        x_sde, mean, std = sde_step(
            kind, x_sde, velocity(x_sde, sig), sigmas[i], sigmas[i + 1], 0.0, sigma_max=float(sigmas[1]), generator=g
        )
        assert float(std) == 0.0 and torch.equal(x_sde, mean)
        assert torch.equal(x_ode, x_ref)  # same float32 operations as diffusers
        torch.testing.assert_close(x_sde, x_ref, rtol=0, atol=1e-6)
    assert x_ref.abs().max() > 0.1  # the comparison is not between vanishing tensors


def test_flow_grpo_clamp_at_t1_hand_computed():
    # sigma = 1, sigma_next = sigma_max = 0.9, a = 0.7: sigma_t = 0.7 sqrt(1 / 0.1), std = sigma_t sqrt(0.1) = 0.7,
    # mean = x (1 + 0.49 * 10 * (-0.1) / 2) + v * (1 + 0) * (-0.1) = 0.755 x - 0.1 v.
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    mean, std = flow_sde_mean_std(x, v, 1.0, 0.9, 0.7, sigma_max=0.9)
    assert std.item() == pytest.approx(0.7, rel=1e-6)
    torch.testing.assert_close(mean, torch.tensor([[0.755 - 0.3, -1.51 - 0.05]]), rtol=0, atol=1e-6)
    # On the SD3 schedule the first step's std is exactly the noise level: sqrt(-dt / (1 - sigmas[1])) = 1.
    sigmas = flow_sigmas(SD3, 10)
    # sigmas[1]: s = 1 - (1 - 0.003 / 1.002) / 9 = 0.8892216 on the unshifted grid, then 3 s / (1 + 2 s).
    assert sigmas[1].item() == pytest.approx(0.9601293, abs=1e-6)
    _, std = flow_sde_mean_std(x, v, sigmas[0], sigmas[1], 0.7, sigma_max=float(sigmas[1]))
    assert std.item() == pytest.approx(0.7, rel=1e-5)


def test_mid_step_hand_computed_for_each_kind():
    # sigma 0.5 -> 0.25, x = 1, v = 2, dt = -0.25.
    x, v = torch.ones(1, 1), torch.full((1, 1), 2.0)
    # Flow-GRPO a = 0.7: sigma_t^2 = 0.49 * 0.5 / 0.5 = 0.49;
    # mean = 1 (1 - 0.49 * 0.25) + 2 (1 + 0.49 * 0.5) (-0.25) = 0.8775 - 0.6225 = 0.255; std = 0.7 * 0.5.
    mean, std = flow_sde_mean_std(x, v, 0.5, 0.25, 0.7, sigma_max=0.9)
    assert (mean.item(), std.item()) == pytest.approx((0.255, 0.35), rel=1e-6)
    # DanceGRPO eta = 0.5: mean = 1 (1 - 0.0625) + 2 * 1.125 * (-0.25) = 0.375; std = 0.5 * sqrt(0.25).
    mean, std = dance_sde_mean_std(x, v, 0.5, 0.25, 0.5, sigma_max=0.9)
    assert (mean.item(), std.item()) == pytest.approx((0.375, 0.25), rel=1e-6)
    # CPS level 0.5: std = 0.25 sin(pi/4); x0_hat = 0, x1_hat = 2, mean = 2 sqrt(0.0625 - 0.03125).
    mean, std = cps_mean_std(x, v, 0.5, 0.25, 0.5, sigma_max=0.9)
    assert (mean.item(), std.item()) == pytest.approx((2 * math.sqrt(0.03125), 0.25 * math.sqrt(0.5)), rel=1e-6)


def _expected_mean_std(kind, x, v, s, s_next, level, sigma_max):
    """The three transitions written out independently in float64 scalars."""
    dt = s_next - s
    if kind == "cps":
        std = s_next * math.sin(level * math.pi / 2)
        return (x - s * v) * (1 - s_next) + (x + (1 - s) * v) * math.sqrt(s_next**2 - std**2), std
    sig_t = level if kind == "dance_sde" else level * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))
    mean = x * (1 + sig_t**2 / (2 * s) * dt) + v * (1 + sig_t**2 * (1 - s) / (2 * s)) * dt
    return mean, sig_t * math.sqrt(-dt)


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_moments_of_sde_draws_match_formula(kind):
    sigmas = flow_sigmas(SD3, 10).double()
    s, s_next, sigma_max = sigmas[5].item(), sigmas[6].item(), sigmas[1].item()
    x_val, v_val, level = 0.3, -0.8, 0.7
    n = 200_000
    x, v = torch.full((4, n // 4), x_val), torch.full((4, n // 4), v_val)
    g = torch.Generator().manual_seed(123)
    x_next, _, _ = sde_step(kind, x, v, s, s_next, level, sigma_max=sigma_max, generator=g)
    mean, std = _expected_mean_std(kind, x_val, v_val, s, s_next, level, sigma_max)
    assert std > 0.01
    # 5-sigma bounds: SE(mean) = std / sqrt(n), SE(std) ~ std / sqrt(2 n).
    assert abs(x_next.double().mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(x_next.double().std().item() - std) < 5 * std / math.sqrt(2 * n)


def test_cps_preserves_forward_marginal_coefficients():
    # With the oracle velocity v = eps - x0 at x = (1 - s) x0 + s eps, CPS gives
    # x_next = (1 - s') x0 + sqrt(s'^2 - std^2) eps + std z: noise of total std s', as the forward process.
    n, s, s_next = 200_000, 0.6, 0.4
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, n // 2, generator=g)
    eps = torch.randn(2, n // 2, generator=g)
    x = (1 - s) * x0 + s * eps
    x_next, _, std = sde_step("cps", x, eps - x0, s, s_next, 0.8, sigma_max=0.9, generator=g)
    resid = (x_next - (1 - s_next) * x0).double()
    assert abs(resid.mean().item()) < 5 * s_next / math.sqrt(n)
    assert abs(resid.std().item() - s_next) < 5 * s_next / math.sqrt(2 * n)
    keep = math.sqrt(s_next**2 - std.item() ** 2)
    assert abs((resid * eps.double()).mean().item() - keep) < 5 * s_next / math.sqrt(n)


def test_last_step_to_zero():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    mean, std = flow_sde_mean_std(x, v, 0.1, 0.0, 0.7, sigma_max=0.9)
    # sigma_t = 0.7 sqrt(0.1 / 0.9), std = sigma_t sqrt(0.1): finite and positive at the last step.
    assert std.item() == pytest.approx(0.7 * math.sqrt(0.1 / 0.9) * math.sqrt(0.1), rel=1e-6)
    assert torch.isfinite(mean).all()
    mean, std = cps_mean_std(x, v, 0.1, 0.0, 0.7, sigma_max=0.9)
    assert std.item() == 0.0
    torch.testing.assert_close(mean, ode_step(x, v, 0.1, 0.0))  # CPS's last step is the ODE step (x0_hat)


def test_gaussian_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(3)
    x, mean = torch.randn(5, 2, 3, 4, generator=g), torch.randn(5, 2, 3, 4, generator=g)
    for std in (torch.tensor(0.37), torch.rand(5, 1, 1, 1, generator=g) + 0.1, torch.rand(5, 2, 3, 4, generator=g) + 0.1):
        expected = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
        got = gaussian_log_prob(x, mean, std)
        assert got.shape == (5,)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # A float std works too and a 1-D x is its own per-sample log-prob.
    torch.testing.assert_close(gaussian_log_prob(x[:, 0, 0, 0], mean[:, 0, 0, 0], 0.5),
                               torch.distributions.Normal(mean[:, 0, 0, 0], 0.5).log_prob(x[:, 0, 0, 0]))


def test_gaussian_log_prob_rejects_zero_std_and_bad_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_log_prob(x, x, torch.tensor(0.0))
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_log_prob(x, x, torch.tensor([[0.5], [0.0]]))
    with pytest.raises(ValueError, match="same shape"):
        gaussian_log_prob(x, torch.zeros(2, 1), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_log_prob(x, x, torch.ones(2, 3, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_sde_step_noise_generator_and_log_prob(kind):
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    x_next, mean, std = sde_step(kind, x, v, 0.7, 0.5, 0.6, sigma_max=0.9, noise=noise)
    assert torch.equal(x_next, mean + std * noise)
    a = sde_step(kind, x, v, 0.7, 0.5, 0.6, sigma_max=0.9, generator=torch.Generator().manual_seed(9))[0]
    b = sde_step(kind, x, v, 0.7, 0.5, 0.6, sigma_max=0.9, generator=torch.Generator().manual_seed(9))[0]
    assert torch.equal(a, b) and not torch.equal(a, x_next)
    # The recomputation the trainer does equals the density of the sampled transition.
    lp = sde_log_prob(kind, x, v, x_next, 0.7, 0.5, 0.6, sigma_max=0.9)
    torch.testing.assert_close(lp, torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_sigmas_match_scalar_calls(kind):
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    s, s_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.8, 0.4, 0.0])
    mean, std = SDE_STEPS[kind](x, v, s, s_next, 0.5, sigma_max=0.8)
    assert std.shape == (3, 1)
    for i in range(3):
        m_i, s_i = SDE_STEPS[kind](x[i : i + 1], v[i : i + 1], s[i].item(), s_next[i].item(), 0.5, sigma_max=0.8)
        torch.testing.assert_close(mean[i : i + 1], m_i)
        torch.testing.assert_close(std[i].squeeze(), s_i.squeeze())


def test_half_precision_inputs_are_upcast():
    x = torch.randn(2, 4).to(torch.bfloat16)
    mean, std = flow_sde_mean_std(x, x, 0.5, 0.4, 0.7, sigma_max=0.9)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    assert ode_step(x, x, 0.5, 0.4).dtype == torch.float32


def test_bad_step_input_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step("ddim", x, x, 0.5, 0.4, 0.7, sigma_max=0.9, generator=torch.Generator())
    with pytest.raises(ValueError, match="exactly one"):
        sde_step("flow_sde", x, x, 0.5, 0.4, 0.7, sigma_max=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        sde_step("flow_sde", x, x, 0.5, 0.4, 0.7, sigma_max=0.9, generator=torch.Generator(), noise=x)
    with pytest.raises(ValueError, match="noise must have"):
        sde_step("flow_sde", x, x, 0.5, 0.4, 0.7, sigma_max=0.9, noise=torch.zeros(3))
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_mean_std(x, x, 0.5, 0.4, -0.1, sigma_max=0.9)
    with pytest.raises(ValueError, match="noise_level"):
        cps_mean_std(x, x, 0.5, 0.4, 1.5, sigma_max=0.9)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_mean_std(x, x, 1.0, 0.9, 0.7, sigma_max=1.0)
    with pytest.raises(ValueError, match="same shape"):
        ode_step(x, torch.zeros(2, 1), 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma must be"):
        ode_step(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.2)
