"""The rollout strategies: one module each, registered by name here (a new strategy is its module and one line).

Flow-matching policies:
- `flow_grpo`: SDE on every step of the window (the first `sde_steps`, 0 = all), every SDE step trained.
- `dance_grpo`: the same sampling, a random subset of the SDE steps trained (the same for every row).
- `mixgrpo`: MixGRPO, SDE only in a window of `sde_steps` steps that slides along the schedule as training goes, ODE
  elsewhere; optionally DPM-Solver++(2M) on a compressed schedule after the window (MixGRPO-Flash).
- `g2rpo`: G²RPO singular stochastic sampling, each group sharing its ODE path up to one branch step where each
  member takes one SDE step; optional multi-granularity advantages.
- `dense_grpo`: DenseGRPO, per-step rewards from ODE completions of the intermediate latents, advantages per step,
  and a per-step noise scale calibrated from the signs of the dense rewards.
- `diffusion_nft`: DiffusionNFT, forward-process training on the old policy's deterministic samples: implicit
  positive and negative policies weighted by each sample's optimality probability.
- `awm`: Advantage Weighted Matching, the advantage-weighted flow-matching loss on deterministic samples.
Masked diffusion policies:
- `co_grpo`: Co-GRPO, the model and its inference schedule trained on one advantage per trajectory.
"""
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, Strategy, initial_noise, sde_noise
from flowgrpo.strategies.co_grpo import CoGRPO
from flowgrpo.strategies.dance_grpo import DanceGRPO
from flowgrpo.strategies.dense_grpo import DenseGRPO
from flowgrpo.strategies.flow_grpo import FlowGRPO
from flowgrpo.strategies.diffusion_nft import DiffusionNFT
from flowgrpo.strategies.awm import AWM
from flowgrpo.strategies.g2rpo import G2RPO
from flowgrpo.strategies.mixgrpo import MixGRPO
from flowgrpo.strategies.scoring import ImageScoring

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    FlowGRPO,
    DanceGRPO,
    MixGRPO,
    G2RPO,
    DenseGRPO,
    DiffusionNFT,
    AWM,
    CoGRPO,
)}

__all__ = ["AWM", "STRATEGIES", "CoGRPO", "DiffusionNFT", "DanceGRPO", "DenseGRPO", "FlowGRPO", "FlowStrategy", "G2RPO", "ImageScoring",
           "MixGRPO", "RunContext", "Sampling", "Strategy", "initial_noise", "sde_noise"]
