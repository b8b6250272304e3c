"""Rollout strategies of flow GRPO: which steps are stochastic, which are trained, and any advantages of their own.

- `flow_grpo`: SDE on every step of the window (the first `sde_steps`, 0 = all), every SDE step trained.
- `dance_grpo`: the same sampling, a random subset of `train_steps` of the SDE steps trained (the same for every row).
- `mixgrpo`: MixGRPO, SDE only in a window of `sde_steps` steps that slides along the schedule as training goes, ODE
  elsewhere; optionally DPM-Solver++(2M) on a compressed schedule after the window (MixGRPO-Flash).
- `g2rpo`: G²RPO singular stochastic sampling, each group sharing its ODE path up to one branch step where each
  member takes one SDE step; optional multi-granularity advantages.
- `dense_grpo`: DenseGRPO, per-step rewards from ODE completions of the intermediate latents, advantages per step,
  and a per-step noise scale calibrated from the signs of the dense rewards.
"""
from flowgrpo.strategies.base import DanceGRPO, FlowGRPO, Strategy, initial_noise, sde_noise
from flowgrpo.strategies.dense import DenseGRPO
from flowgrpo.strategies.g2rpo import G2RPO
from flowgrpo.strategies.mixgrpo import MixGRPO

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FlowGRPO, DanceGRPO, MixGRPO, G2RPO, DenseGRPO)}

__all__ = ["STRATEGIES", "DanceGRPO", "DenseGRPO", "FlowGRPO", "G2RPO", "MixGRPO", "Strategy", "initial_noise",
           "sde_noise"]
