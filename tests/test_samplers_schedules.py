"""flow_sigmas must reproduce diffusers' FlowMatchEulerDiscreteScheduler schedules bit for bit; offset schedules by hand."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo.samplers.schedules import calculate_shift, flow_sigmas, offset_schedule, timesteps_from_sigmas

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# Sana's scheduler_config (DPM-Solver with flow sigmas); its Euler equivalent is shift = flow_shift.
SANA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "use_flow_sigmas": True,
}
STEPS = [1, 2, 4, 10, 28, 50]


def _diffusers_sigmas(cfg, n, mu=None, sigmas=None):
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(n, mu=mu, sigmas=sigmas)
    return sched.sigmas


@pytest.mark.parametrize("n", STEPS)
def test_sd3_static_shift_matches_diffusers_exactly(n):
    ours = flow_sigmas(SD3, n)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
    assert torch.equal(ours, _diffusers_sigmas(SD3, n))
    assert ours[0] == 1.0 and ours[-1] == 0.0


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_flux_dynamic_shift_matches_diffusers_exactly(n, seq_len):
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert torch.equal(flow_sigmas(FLUX, n, image_seq_len=seq_len), _diffusers_sigmas(FLUX, n, mu=mu))
    # FluxPipeline's own path: unshifted linspace(1, 1/n, n) passed as sigmas.
    base = np.linspace(1.0, 1 / n, n)
    ours = flow_sigmas(FLUX, n, image_seq_len=seq_len, base_sigmas=base)
    assert torch.equal(ours, _diffusers_sigmas(FLUX, n, mu=mu, sigmas=base))


def test_calculate_shift_hand_values():
    # mu is linear in the token count: base_shift at 256 tokens, max_shift at 4096.
    assert calculate_shift(256) == pytest.approx(0.5, abs=1e-15)
    assert calculate_shift(4096) == pytest.approx(1.15, abs=1e-15)
    assert calculate_shift(2176) == pytest.approx(0.825, abs=1e-15)  # midpoint


def test_dynamic_shift_hand_value():
    # 4 steps, 4096 tokens: mu = 1.15 and sigma' = e^mu s / (e^mu s + 1 - s) on linspace(1, 0.001, 4).
    ours = flow_sigmas(FLUX, 4, image_seq_len=4096)
    s = np.linspace(1.0, 0.0010000000474974513, 4)
    expected = np.exp(1.15) * s / (np.exp(1.15) * s + 1 - s)
    torch.testing.assert_close(ours[:-1], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)


@pytest.mark.parametrize("n", STEPS)
def test_sana_flow_config_is_euler_with_flow_shift(n):
    euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    euler.set_timesteps(n)
    assert torch.equal(flow_sigmas(SANA, n), euler.sigmas)
    if n > 1:  # diffusers' from_config silently drops flow_shift (shift 1.0); we must not.
        assert not torch.equal(flow_sigmas(SANA, n), _diffusers_sigmas(SANA, n))


@pytest.mark.parametrize("n", [2, 5, 20])
def test_linear_time_shift_and_shift_terminal_match_diffusers(n):
    cfg = dict(FLUX, time_shift_type="linear")
    mu = calculate_shift(1024)
    assert torch.equal(flow_sigmas(cfg, n, image_seq_len=1024), _diffusers_sigmas(cfg, n, mu=mu))
    cfg = {"num_train_timesteps": 1000, "shift": 2.05, "shift_terminal": 0.1}
    ours = flow_sigmas(cfg, n)
    assert torch.equal(ours, _diffusers_sigmas(cfg, n))
    assert ours[-2].item() == pytest.approx(0.1, abs=1e-6)


def test_timesteps_from_sigmas_equal_scheduler_timesteps():
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    sched.set_timesteps(10)
    sigmas = flow_sigmas(SD3, 10)
    assert torch.equal(timesteps_from_sigmas(sigmas[:-1], 1000), sched.timesteps)
    assert timesteps_from_sigmas(torch.tensor([0.5, 0.0]), 1000).tolist() == [500.0, 0.0]


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        (SD3, {"num_steps": 0}, "num_steps"),
        (SD3, {"num_steps": 2.0}, "num_steps"),
        (FLUX, {"num_steps": 4}, "image_seq_len"),
        (FLUX, {"num_steps": 4, "image_seq_len": 0}, "image_seq_len"),
        ({"shift": 3.0, "flow_shift": 2.0}, {"num_steps": 4}, "unknown"),
        ({"shift": 3.0, "use_karras_sigmas": True}, {"num_steps": 4}, "not supported"),
        ({"invert_sigmas": True}, {"num_steps": 4}, "not supported"),
        ({"time_shift_type": "cubic"}, {"num_steps": 4}, "time_shift_type"),
        ({"_class_name": "EulerDiscreteScheduler"}, {"num_steps": 4}, "unsupported scheduler"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, {"num_steps": 4}, "use_flow_sigmas"),
        (SD3, {"num_steps": 4, "base_sigmas": [1.0, 0.5]}, "base_sigmas"),
        (SD3, {"num_steps": 2, "base_sigmas": [1.0, 0.0]}, "base_sigmas"),
        ({"shift_terminal": 0.1}, {"num_steps": 1}, "shift_terminal"),
    ],
)
def test_bad_input_raises(cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_sigmas(cfg, **kwargs)


def test_timesteps_from_sigmas_bad_input():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        timesteps_from_sigmas(torch.tensor([1.0, 0.0]), 0)
    with pytest.raises(ValueError, match="floating"):
        timesteps_from_sigmas(torch.tensor([1, 0]), 1000)


def test_offset_schedule_by_hand():
    fine = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0])  # 3 steps x m = 2
    assert offset_schedule(fine, 3, 1).tolist() == pytest.approx([1.0, 0.9, 0.7, 0.0])
    assert offset_schedule(fine, 3, 2).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.0])
    # every offset keeps the step count and both ends; together they visit every interior fine sigma
    sd3 = flow_sigmas(SD3, 40)
    schedules = [offset_schedule(sd3, 10, j) for j in range(1, 5)]
    assert all(len(s) == 11 and s[0] == sd3[0] and s[-1] == 0 and (s.diff() < 0).all() for s in schedules)
    visited = torch.cat([s[1:-1] for s in schedules]).sort(descending=True).values
    assert torch.equal(visited, sd3[1:37])
    with pytest.raises(ValueError, match=r"offset must be in \[1, 2\], got 3"):
        offset_schedule(fine, 3, 3)
    with pytest.raises(ValueError, match="a grid of num_steps x m steps ending at 0"):
        offset_schedule(fine, 4, 1)
