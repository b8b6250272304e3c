"""Flow-matching samplers: schedules from scheduler configs, ODE/SDE steps with log-probs, rollouts."""

from flowgrpo.samplers.rollout import Trajectory, group_noise, sample_trajectory
from flowgrpo.samplers.schedules import calculate_shift, flow_sigmas, offset_schedule, timesteps_from_sigmas
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

__all__ = [
    "SDE_STEPS",
    "Trajectory",
    "calculate_shift",
    "cps_mean_std",
    "dance_sde_mean_std",
    "flow_sde_mean_std",
    "flow_sigmas",
    "offset_schedule",
    "gaussian_log_prob",
    "group_noise",
    "ode_step",
    "sample_trajectory",
    "sde_log_prob",
    "sde_step",
    "timesteps_from_sigmas",
]
