"""sample_trajectory and the DanceGRPO / MixGRPO step selections."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo.samplers.rollout import Trajectory, group_noise, sample_trajectory
from flowgrpo.samplers.schedules import flow_sigmas
from flowgrpo.samplers.steps import SDE_STEPS, ode_step, sde_log_prob
from flowgrpo.strategies.dance_grpo import dance_train_steps
from flowgrpo.strategies.g2rpo import coarse_tail
from flowgrpo.strategies.mixgrpo import mixgrpo_window

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
N_STEPS = 8
KINDS = sorted(SDE_STEPS)


def _velocity(x, sigma):
    # A fixed nonlinear field that depends on sigma, so every step does something different.
    w = torch.linspace(-1.0, 1.0, x.shape[-1])
    return torch.tanh(x * w) - x + sigma.view(-1, *([1] * (x.ndim - 1)))


def _full_mask(kind):
    mask = torch.ones(N_STEPS, dtype=torch.bool)
    if kind == "cps":
        mask[-1] = False  # CPS's step to sigma 0 is deterministic
    return mask


def _x_init(seed=0):
    return torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(seed))


def _run(kind, seed, mask=None, x_init=None):
    return sample_trajectory(
        _velocity,
        _x_init() if x_init is None else x_init,
        flow_sigmas(SD3, N_STEPS),
        sde_mask=_full_mask(kind) if mask is None else mask,
        kind=kind,
        noise_level=0.7 if kind != "dance_sde" else 0.3,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_trajectory_and_shapes(kind):
    a, b, c = _run(kind, 5), _run(kind, 5), _run(kind, 6)
    assert isinstance(a, Trajectory) and a.kind == kind
    assert a.latents.shape == (4, N_STEPS + 1, 3, 6) and a.log_probs.shape == (4, N_STEPS)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[:, -1], c.latents[:, -1])
    assert torch.equal(a.latents[:, 0], _x_init())
    assert torch.isfinite(a.log_probs).all()
    assert torch.equal(a.sde_mask, _full_mask(kind)) and torch.equal(a.sigmas, flow_sigmas(SD3, N_STEPS))
    assert a.sigma_max == float(a.sigmas[1])


@pytest.mark.parametrize("kind", KINDS)
def test_log_probs_recomputed_from_stored_latents_equal_sampled(kind):
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1 if kind != "cps" else 0], dtype=torch.bool)  # SDE and ODE mixed
    traj = _run(kind, 11, mask=mask)
    for i in range(N_STEPS):
        x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
        sigma, sigma_next = traj.sigmas[i], traj.sigmas[i + 1]
        v = _velocity(x, sigma.expand(4))
        if traj.sde_mask[i]:
            lp = sde_log_prob(kind, x, v, x_next, sigma, sigma_next, traj.noise_level, sigma_max=traj.sigma_max)
            assert torch.equal(lp, traj.log_probs[:, i])
        else:
            assert torch.equal(x_next, ode_step(x, v, sigma, sigma_next))
            assert torch.equal(traj.log_probs[:, i], torch.zeros(4))


def test_all_ode_mask_equals_diffusers_euler_sampling():
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    sched.set_timesteps(N_STEPS)
    x = _x_init()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(_velocity(x, sched.sigmas[i].expand(4)), t, x).prev_sample
    traj = sample_trajectory(
        _velocity, _x_init(), flow_sigmas(SD3, N_STEPS), sde_mask=torch.zeros(N_STEPS, dtype=torch.bool), generator=None
    )
    assert torch.equal(traj.latents[:, -1], x)
    assert torch.equal(traj.log_probs, torch.zeros(4, N_STEPS))


def test_ode_steps_before_the_window_ignore_the_seed():
    mask = mixgrpo_window(3, N_STEPS, 2, 1)  # SDE on steps 3, 4
    a, b = _run("flow_sde", 1, mask=mask), _run("flow_sde", 2, mask=mask)
    assert torch.equal(a.latents[:, :4], b.latents[:, :4])  # x at sigmas[0..3]: no noise drawn yet
    assert not torch.equal(a.latents[:, 4], b.latents[:, 4])
    assert (a.log_probs[:, [3, 4]] != 0).all() and (a.log_probs[:, mask.logical_not()] == 0).all()


def test_first_flow_grpo_step_has_std_equal_to_noise_level():
    # Empirically: (x_1 - mean) / 0.7 must be standard normal at the clamped first step.
    x_init = torch.zeros(2, 50_000)
    traj = sample_trajectory(
        lambda x, s: torch.zeros_like(x), x_init, flow_sigmas(SD3, N_STEPS),
        sde_mask=_full_mask("flow_sde"), generator=torch.Generator().manual_seed(0),
    )
    # x = 0, v = 0: mean is 0, so x_1 is pure noise of std noise_level.
    assert abs(traj.latents[:, 1].std().item() - 0.7) < 5 * 0.7 / math.sqrt(2 * 100_000)


def test_half_precision_init_gives_float32_latents():
    traj = _run("flow_sde", 0, x_init=_x_init().to(torch.bfloat16))
    assert traj.latents.dtype == torch.float32 and traj.log_probs.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cps", "sde_mask": torch.ones(N_STEPS, dtype=torch.bool)}, "deterministic"),
        ({"noise_level": 0.0}, "deterministic"),
        ({"generator": None}, "generator"),
        ({"kind": "euler"}, "unknown SDE kind"),
        ({"sde_mask": torch.ones(N_STEPS)}, "sde_mask"),
        ({"sde_mask": torch.ones(N_STEPS + 1, dtype=torch.bool)}, "sde_mask"),
        ({"sigmas": torch.tensor([1.0, 0.5, 0.1])}, "exactly 0"),
        ({"sigmas": torch.tensor([1.0, 0.2, 0.5, 0.0])}, "decrease"),
        ({"sigmas": torch.tensor([1.5, 0.5, 0.0])}, "at most 1"),
        ({"sigmas": torch.tensor([0.0])}, "length"),
        ({"x_init": torch.zeros(4, 3, dtype=torch.long)}, "x_init"),
    ],
)
def test_sample_trajectory_bad_input(kwargs, match):
    args = {
        "x_init": _x_init(),
        "sigmas": flow_sigmas(SD3, N_STEPS),
        "sde_mask": torch.ones(N_STEPS, dtype=torch.bool),
        "kind": "flow_sde",
        "noise_level": 0.7,
        "generator": torch.Generator().manual_seed(0),
    }
    args.update(kwargs)
    n = args["sigmas"].numel() - 1
    if "sde_mask" not in kwargs and n != N_STEPS:
        args["sde_mask"] = torch.ones(max(n, 0), dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        sample_trajectory(_velocity, args.pop("x_init"), args.pop("sigmas"), **args)


def test_dance_train_steps():
    rng = np.random.default_rng(0)
    candidates = torch.arange(10)
    assert torch.equal(dance_train_steps(torch.arange(6), 6, rng), torch.arange(6))
    draws = torch.stack([dance_train_steps(candidates, 3, rng) for _ in range(4000)])
    assert draws.dtype == torch.long and draws.shape == (4000, 3)
    assert (draws[:, 1:] > draws[:, :-1]).all()  # sorted, hence distinct
    assert draws.min() >= 0 and draws.max() <= 9
    # Every step is chosen with probability k / n = 0.3: counts ~ Binomial(4000, 0.3), sd ~ 29.
    counts = torch.bincount(draws.flatten(), minlength=10).double()
    assert ((counts - 1200).abs() < 5 * math.sqrt(4000 * 0.3 * 0.7)).all()
    same = [dance_train_steps(candidates, 4, np.random.default_rng(3)) for _ in range(2)]
    assert torch.equal(*same)
    assert set(dance_train_steps(torch.tensor([2, 5, 7]), 2, rng).tolist()) <= {2, 5, 7}
    for bad in (0, 11):
        with pytest.raises(ValueError, match="must be in"):
            dance_train_steps(candidates, bad, rng)


def _on(mask):
    return mask.nonzero().flatten().tolist()


def _reference_windows(iterations: int, num_steps: int, window: int, shift_every: int, stride: int = 1):
    """MixGRPO's GRPOTrainingStates (progressive, prog_overlap, roll_back; max_timesteps = num_steps - 2), as its
    training loop calls it: get_current_timesteps() then update_iteration(), iteration by iteration."""
    top, cur, it, out = num_steps - 2, 0, 0, []
    for _ in range(iterations):
        out.append(list(range(cur, min(cur + window, top))))
        it += 1
        if it >= shift_every:
            it, cur = 0, cur + stride
        if cur > top:
            cur, it = 0, 0
    return out


def test_mixgrpo_window_follows_the_reference_positions_and_truncation():
    # MixGRPO's FLUX recipe (finetune_flux_grpo_MixGRPO.sh): 25 steps, windows of 4 moving every 25 iterations
    ours = [_on(mixgrpo_window(k, 25, 4, 25, end=23)) for k in range(401)]
    assert ours == _reference_windows(401, 25, 4, 25)
    # the end of a cycle: truncated to 3, 2, 1 steps; the reference's empty window (a shift interval that trains
    # nothing) is skipped, so the roll-back comes one interval earlier
    assert [_on(mixgrpo_window(k, 25, 4, 25, end=23)) for k in (475, 500, 525, 550)] == \
        [[19, 20, 21, 22], [20, 21, 22], [21, 22], [22]]
    reference = [w for w in _reference_windows(3 * 60, 8, 3, 3, stride=2) if w]
    assert [_on(mixgrpo_window(k, 8, 3, 3, end=6, stride=2)) for k in range(len(reference))] == reference
    assert _on(mixgrpo_window(9, 8, 3, 3, end=6, stride=2)) == [0, 1, 2]  # rolled back


def test_mixgrpo_whole_window_slides_and_wraps():
    # 6 steps, window 2, moves every 3 iterations: starts 0,1,2,3,4 then wraps to 0.
    assert mixgrpo_window(0, 6, 2, 3, whole=True).tolist() == [True, True, False, False, False, False]
    assert _on(mixgrpo_window(2, 6, 2, 3, whole=True)) == [0, 1]
    assert _on(mixgrpo_window(3, 6, 2, 3, whole=True)) == [1, 2]
    assert _on(mixgrpo_window(14, 6, 2, 3, whole=True)) == [4, 5]
    assert _on(mixgrpo_window(15, 6, 2, 3, whole=True)) == [0, 1]
    assert _on(mixgrpo_window(15, 6, 2, 3)) == [5]  # truncated instead
    # start=1, end=5: the window stays inside steps 1..4 -> starts 1, 2, 3 then back to 1.
    assert [_on(mixgrpo_window(k, 6, 2, 1, start=1, end=5, whole=True)) for k in range(4)] == \
        [[1, 2], [2, 3], [3, 4], [1, 2]]
    assert mixgrpo_window(7, 4, 4, 2, whole=True).all()
    # stride 2 in the first 6 of 10 steps: windows at 0, 2, 4, then back to 0 (MixGRPO's roll-back)
    assert [_on(mixgrpo_window(k, 10, 2, 5, end=6, stride=2, whole=True)) for k in (0, 4, 5, 10, 14, 15)] == \
        [[0, 1], [0, 1], [2, 3], [4, 5], [4, 5], [0, 1]]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((-1, 6, 2, 3), {}), ((0, 6, 0, 3), {}), ((0, 6, 2, 0), {}), ((0, 6, 7, 1), {}),
     ((0, 6, 2, 1), {"start": 6}), ((0, 6, 2, 1), {"start": 5, "whole": True}), ((0, 6, 2, 1), {"end": 7}),
     ((0, 6, 2, 1), {"start": -1})],
)
def test_mixgrpo_window_bad_input(args, kwargs):
    with pytest.raises(ValueError):
        mixgrpo_window(*args, **kwargs)


def test_group_noise():
    shared = group_noise(3, 4, (2, 5), generator=torch.Generator().manual_seed(0))
    assert shared.shape == (12, 2, 5)
    for g in range(3):
        assert all(torch.equal(shared[4 * g], shared[4 * g + j]) for j in range(1, 4))
    assert not torch.equal(shared[0], shared[4])
    indep = group_noise(3, 4, (2, 5), generator=torch.Generator().manual_seed(0), shared=False)
    assert not torch.equal(indep[0], indep[1])
    assert torch.equal(indep[0], shared[0])  # first draw is the same stream
    with pytest.raises(ValueError, match="group_size"):
        group_noise(3, 0, (2,), generator=torch.Generator())


def test_coarse_tail_hand_computed():
    """σ = 1, 0.9, …, 0 (10 steps): σ[k+1] ++ σ[k+2::λ] after a branch at step k, its last point set to 0 when
    the λ grid misses 0 (the reference's jump to 0 from the point before)."""
    s = torch.linspace(1, 0, 11, dtype=torch.float64)

    def tail(k, lam):
        return [round(v, 6) for v in coarse_tail(s, k, lam).tolist()]

    assert tail(0, 1) == [round(v, 6) for v in s[1:].tolist()]
    assert tail(0, 2) == [0.9, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert tail(0, 3) == [0.9, 0.8, 0.5, 0.0]  # σ[2::3] = 0.8, 0.5, 0.2: 0.5 jumps to 0
    assert tail(1, 2) == [0.8, 0.7, 0.5, 0.3, 0.0]  # σ[3::2] ends at 0.1
    assert tail(2, 3) == [0.7, 0.6, 0.3, 0.0]  # σ[4::3] = 0.6, 0.3, 0: on the grid
    assert tail(7, 3) == [0.2, 0.0]  # σ[9::3] = 0.1 only
    assert tail(8, 3) == [0.1, 0.0]
    assert tail(9, 2) == [0.0]  # a branch at the last step is already finished
    for bad in (-1, 10, 1.0, True):
        with pytest.raises(ValueError, match="branch_step"):
            coarse_tail(s, bad, 2)
    with pytest.raises(ValueError, match="granularity"):
        coarse_tail(s, 0, 0)


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_per_row_mask_branches_from_the_shared_ode_path(kind):
    # Two groups of two sharing their initial noise; group 0 branches at step 1, group 1 at step 4.
    x0 = _x_init()[:2].repeat_interleave(2, dim=0)
    mask = torch.zeros(4, N_STEPS, dtype=torch.bool)
    mask[:2, 1] = True
    mask[2:, 4] = True
    traj = _run(kind, 3, mask=mask, x_init=x0)
    ode = _run(kind, 3, mask=torch.zeros(N_STEPS, dtype=torch.bool), x_init=x0)
    for rows, k in ((slice(0, 2), 1), (slice(2, 4), 4)):
        # identical to the ODE path up to the branch step, members different after it
        assert torch.equal(traj.latents[rows, : k + 1], ode.latents[rows, : k + 1])
        a, b = traj.latents[rows, k + 1]
        assert not torch.allclose(a, b)
        assert (traj.log_probs[rows, k] != 0).all()
        others = torch.ones(N_STEPS, dtype=torch.bool)
        others[k] = False
        assert (traj.log_probs[rows][:, others] == 0).all()
        # after the branch, every step is the Euler step of the same field
        for i in range(k + 1, N_STEPS):
            x = traj.latents[rows, i]
            s = traj.sigmas[i].expand(2)
            assert torch.equal(traj.latents[rows, i + 1], ode_step(x, _velocity(x, s), traj.sigmas[i], traj.sigmas[i + 1]))
        # the branch step's log-prob is the SDE density recomputed from the stored pair
        x = traj.latents[rows, k]
        lp = sde_log_prob(kind, x, _velocity(x, traj.sigmas[k].expand(2)), traj.latents[rows, k + 1], traj.sigmas[k],
                          traj.sigmas[k + 1], 0.7, sigma_max=traj.sigma_max)
        torch.testing.assert_close(lp, traj.log_probs[rows, k], rtol=0, atol=1e-6)


def test_a_full_per_row_mask_equals_the_shared_mask():
    mask = _full_mask("flow_sde")
    a = _run("flow_sde", 9, mask=mask)
    b = _run("flow_sde", 9, mask=mask.expand(4, N_STEPS).clone())
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


@pytest.mark.parametrize("kind", KINDS)
def test_antithetic_pairs_mirror_their_noise_about_the_shared_mean(kind):
    # Two groups of two branching from shared noise at step 2: each pair is mean ± std·ε with one ε.
    x0 = _x_init()[:2].repeat_interleave(2, dim=0)
    mask = torch.zeros(N_STEPS, dtype=torch.bool)
    mask[2] = True
    traj = sample_trajectory(_velocity, x0, flow_sigmas(SD3, N_STEPS), sde_mask=mask, kind=kind,
                             noise_level=0.7 if kind != "dance_sde" else 0.3, generator=torch.Generator().manual_seed(4),
                             antithetic=True)
    x, s = traj.latents[:, 2], traj.sigmas
    mean, std = SDE_STEPS[kind](x, _velocity(x, s[2].expand(4)), s[2], s[3], traj.noise_level, sigma_max=traj.sigma_max)
    eps = (traj.latents[:, 3] - mean) / std
    torch.testing.assert_close(eps[1::2], -eps[0::2], rtol=0, atol=1e-5)
    # the even rows' noise is the generator's ordinary draw: each member is still an exact sample of the step
    torch.testing.assert_close(eps[0::2], torch.randn(x.shape, generator=torch.Generator().manual_seed(4))[0::2],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.log_probs[0::2, 2], traj.log_probs[1::2, 2], rtol=0, atol=1e-6)  # symmetric
    lp = sde_log_prob(kind, x, _velocity(x, s[2].expand(4)), traj.latents[:, 3], s[2], s[3], traj.noise_level,
                      sigma_max=traj.sigma_max)
    torch.testing.assert_close(lp, traj.log_probs[:, 2], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch must be even"):
        sample_trajectory(_velocity, x0[:3], flow_sigmas(SD3, N_STEPS), sde_mask=mask, kind=kind,
                          generator=torch.Generator().manual_seed(4), antithetic=True)
