"""DenseGRPO: a reward for every denoising step, and a per-step noise scale calibrated from it.

For each trained (SDE) step t the step-wise reward estimate R_t = R(decode(ODE(x_t -> 0))) scores the rollout's own
intermediate latent x_t finished by ODE on the rollout's schedule (all rows and steps in the same calls,
`complete`); the step's dense reward is the gain across it, dR_t = R_{t+1} - R_t, where past the last SDE
step the rest of the trajectory is that ODE, so R there is the final reward. The dense rewards telescope: their sum
over the steps is R_final - R(ODE from the initial noise). Advantages are normalised per step across each group.
With a pairwise judge, R is the image's win rate within its group.

Reward-aware noise calibration: the SDE noise of step t is scaled by psi(t) (1 at the start). For the first
``calibrate_iterations`` iterations, psi(t) += eps2 when the step's dense rewards are balanced in sign over the whole
batch (|#positive - #negative| < eps1) and psi(t) -= eps2 otherwise (a step whose noise mostly helps or mostly hurts
has the wrong amount of it); then psi is frozen. psi is training state, logged every iteration.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from flowgrpo.core import TRACKED_ESTIMATORS, AdvantageResult
from flowgrpo.eval.plots import line_plot
from flowgrpo.samplers.steps import ode_step
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, option


@dataclass(frozen=True)
class DenseGRPOOptions:
    calibrate_iterations: int = option(20, "iterations during which the per-step noise scale is calibrated from the "
                                           "signs of the dense rewards; frozen after")
    calibrate_balance: float = option(2.0, "a step's dense rewards count as balanced when |#positive - #negative| < "
                                           "this (over the whole batch)")
    calibrate_step: float = option(0.01, "how far one calibration round moves a step's noise scale")


def calibrate_noise(psi: list[float], dense: Tensor, steps: list[int], *, balance: float, step: float) -> list[float]:
    """psi after one calibration round: ``dense`` [B, S] are the dense rewards of SDE steps ``steps`` over the whole
    batch. A step with balanced signs gets more noise, the others less (never below ``step``, so it stays random)."""
    out = list(psi)
    for j, t in enumerate(steps):
        pos, neg = int((dense[:, j] > 0).sum()), int((dense[:, j] < 0).sum())
        out[t] = max(out[t] + (step if abs(pos - neg) < balance else -step), step)
    return out


def dense_rewards(values: dict[int, Tensor], steps: list[int]) -> Tensor:
    """[B, S] reward gains across each step t of ``steps``: values[t + 1] - values[t]."""
    return torch.stack([values[t + 1] - values[t] for t in steps], dim=1)


@torch.no_grad()
def complete(policy, ro, starts: list[int]) -> Tensor:
    """The intermediate clean images: every row's latent at each step in ``starts`` finished by ODE (Euler) on the
    rollout's own schedule, all rows and starts in the same calls, [b, len(starts), 3, H, W]."""
    b, n, t_total = len(ro), len(starts), ro.sigmas.numel() - 1
    rows = torch.arange(b).repeat(n)  # pair j * b + i: row i from starts[j]
    start = torch.tensor(starts).repeat_interleave(b)
    x = ro.latents[rows, start].clone()
    velocity = policy.velocity_fn(policy.cond(ro.prompts), ro.guidance, exact=False)
    sigmas = ro.sigmas.to(x.device)
    for t in range(min(starts), t_total):
        idx = torch.nonzero(start <= t).flatten()
        v = velocity(x[idx], sigmas[t].expand(len(idx)), rows[idx])
        x[idx] = ode_step(x[idx], v, sigmas[t], sigmas[t + 1]).to(x.dtype)
    images = policy.decode(x)
    return images.view(n, b, *images.shape[1:]).transpose(0, 1)


class DenseGRPO(FlowStrategy):
    """DenseGRPO: a reward for every SDE step from ODE completions, advantages per step, and a per-step noise
    scale calibrated from the signs of those rewards."""

    name = "dense_grpo"
    Options = DenseGRPOOptions

    @classmethod
    def check(cls, options: DenseGRPOOptions, sampling: Sampling, run: RunContext) -> None:
        for name in ("calibrate_iterations", "calibrate_balance", "calibrate_step"):
            if getattr(options, name) < 0:
                raise ValueError(f"dense_grpo.{name} must be >= 0, got {getattr(options, name)}")
        if run.advantage in TRACKED_ESTIMATORS:
            raise ValueError(f"advantage {run.advantage!r} keeps per-prompt statistics; dense_grpo normalises one "
                             "reward per step")

    def __init__(self, policy, options: DenseGRPOOptions, sampling: Sampling, scoring):
        super().__init__(policy, options, sampling, scoring)
        self.psi = [1.0] * sampling.num_steps

    def noise_level(self, num_steps: int) -> Tensor:
        return self.sampling.noise_level * torch.tensor(self.psi[:num_steps])

    def advantages(self, ro, rewards: Tensor, plan, trainer) -> AdvantageResult:
        steps = ro.train_steps[0].tolist()  # every row trains the same SDE steps
        last = max(steps)
        starts = sorted(set(steps) | {t + 1 for t in steps if t < last})
        images = complete(self.policy, ro, starts)  # [b, n, 3, H, W]
        values = {t: self.scoring.value(replace(ro, images=images[:, j]), plan) for j, t in enumerate(starts)}
        values[last + 1] = self.scoring.value(ro, plan, rewards)  # after the last SDE step the trajectory is the ODE
        dense = dense_rewards(values, steps)
        per_step = [trainer.estimate(plan, dense[:, j], prompt_keys=[r["prompt"] for r in plan.rows])
                    for j in range(len(steps))]
        valid = torch.stack([a.valid for a in per_step]).all(dim=0)
        adv = torch.stack([a.advantages for a in per_step], dim=1) * valid[:, None]
        everyone = plan.gather(dense)
        stats = {**per_step[0].stats, "n_valid": float(plan.gather(valid.double()).sum()),
                 **{f"dense_reward/step{t}": float(everyone[:, j].nanmean()) for j, t in enumerate(steps)}}
        o = self.options
        if plan.iteration < o.calibrate_iterations:
            self.psi = calibrate_noise(self.psi, everyone, steps, balance=o.calibrate_balance, step=o.calibrate_step)
        return AdvantageResult(adv, valid, stats)

    def metrics(self, ro, rewards: Tensor, plan) -> dict[str, float]:
        return {f"psi/step{t}": p for t, p in enumerate(self.psi[: self.usable])}

    def report(self, out: Path) -> None:
        """noise_scale.png: psi(t) against the step (and the noise level it gives), with noise_scale.json."""
        steps = list(range(self.usable))
        (out / "noise_scale.json").write_text(json.dumps({"psi": self.psi[: self.usable],
                                                          "noise_level": self.sampling.noise_level}))
        line_plot({"psi(t)": (steps, self.psi[: self.usable])}, out / "noise_scale.png",
                  title=f"DenseGRPO noise scale per step (calibrated for {self.options.calibrate_iterations} "
                        "iterations)",
                  xlabel="step t", ylabel="psi(t)")

    def state_dict(self) -> dict:
        return {"psi": self.psi}

    def load_state_dict(self, state: dict) -> None:
        self.psi = [float(p) for p in state["psi"]]
