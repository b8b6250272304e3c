"""What every rollout strategy of flow GRPO shares, and the keyed draws of flow rollouts.

A strategy is one module that owns its parts: its options (a small frozen dataclass whose fields carry their help
text; on the command line ``--<strategy>.<option>``, in YAML a mapping under the strategy's name), their checks, its
rollout, which steps train, any advantages of its own, the state it carries across iterations and what it reports.
It is the trainer's task for its policy: it receives the policy, its own options, the shared sampling settings and
the run's scoring, never the whole run configuration. Adding one is a new module and a line in the registry.

A strategy sees the whole iteration (`Plan`): its choices (the SDE window, a group's branch step, the subset of
steps trained) come from the iteration's shared generator, so every process makes the same ones whatever the number
of processes. Each returns masks over the GLOBAL batch; the task keeps its own rows. State a strategy carries across
iterations (a window position, a calibrated noise scale) goes into the training state through ``state_dict``.

Every random draw is keyed by the global sample (see `flowgrpo.samplers.noise`): sample i of iteration t starts from
noise keyed (seed, t, i), or (seed, t, group) when a group shares its initial noise, and its SDE step k draws noise
keyed (seed, t, i, k), so a process makes exactly the images a single process would make for the same samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from flowgrpo.core import AdvantageResult
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.samplers.noise import KeyedNoise, Stream, keyed_normal
from flowgrpo.samplers.schedules import offset_schedule
from flowgrpo.strategies.scoring import ImageScoring


def option(default, help: str):
    """A strategy option: its default and its help text (shown under the strategy in ``flowgrpo train --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    """A strategy without options of its own."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings every strategy shares (a run's `TrainConfig.sampling`)."""

    seed: int = 0
    num_steps: int = 10  # denoising steps of a rollout
    sde_steps: int = 3  # the SDE window: the first k steps (0 = the strategy's default)
    guidance: float = 4.5
    noise_level: float = 1.2
    sde_kind: str = "flow_sde"
    shared_noise: bool = True  # a group's members start from the same initial noise
    antithetic: bool = False  # members 2j and 2j + 1 take opposite SDE noise
    noise_freqs: int = 0  # > 0: SDE noise in the k x k lowest DCT frequencies only
    schedule_jitter: int = 0  # > 0: each iteration's schedule at a random offset on the m x finer grid
    grpo_guard: bool = False  # normalised PPO ratios of the SDE steps (the rollouts keep their step means)


@dataclass(frozen=True)
class RunContext:
    """What else of a run a strategy may refuse to work with."""

    advantage: str = "grpo"  # the advantage estimator's name
    judge: str = ""  # Pref-GRPO's pairwise judge ('' = pointwise advantages)
    sharding: str = "ddp"
    kl_convention: str = "exact"  # flow_grpo: the SDE step's KL times its |dt|


def initial_noise(sampling: Sampling, plan, shape: tuple[int, ...], groups: Tensor | None = None) -> Tensor:
    """x_T of this process's rows [b, *shape]: keyed by group when the members share it, else by sample; or of the
    given ``groups`` [p] (one row each, the draw their members share)."""
    if groups is None:
        keys = plan.group_ids[plan.indices] if sampling.shared_noise else plan.indices
    else:
        keys = groups
    per = int(sampling.shared_noise or groups is not None)  # a group's draw is not sample 0's
    return keyed_normal([(sampling.seed, Stream.INIT, plan.iteration, per, int(k)) for k in keys], shape)


def sde_noise(sampling: Sampling, plan) -> KeyedNoise:
    """Each row's SDE noise keyed by its sample; antithetic pairs (members 2j, 2j+1 of a group) share a key and
    take opposite signs."""
    idx = plan.indices
    if sampling.antithetic:
        keys, signs = idx // 2, 1.0 - 2.0 * (idx % 2).float()
    else:
        keys, signs = idx, None
    return KeyedNoise([(sampling.seed, Stream.SDE, plan.iteration, int(k)) for k in keys], signs)


class Strategy:
    """What every strategy is to the trainer: its task for one kind of policy. Subclasses roll out and build the
    update's batch; scoring, logging and state default to nothing of their own."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # the policies it trains, and the checkpoints it resumes
    Options: ClassVar[type] = NoOptions
    reward_weights = None  # one reward: the trainer logs it as it is
    # the run settings `make_config` gives this strategy where the preset, YAML and command line give none, and the
    # grpo estimator's options it brings (its paper's values)
    run_defaults: ClassVar[dict] = {}
    grpo_defaults: ClassVar[dict] = {}

    @classmethod
    def check(cls, options, sampling: Sampling, run: RunContext) -> None:
        """Raise ValueError naming the settings that cannot work together (none here)."""

    def __init__(self, policy, options, sampling: Sampling, scoring: ImageScoring):
        self.policy, self.options, self.sampling, self.scoring = policy, options, sampling, scoring

    def rollout(self, plan):
        raise NotImplementedError

    def update_batch(self, ro, adv: AdvantageResult) -> UpdateBatch:
        raise NotImplementedError

    def score(self, ro, plan) -> Tensor:
        return self.scoring.score(ro, plan)

    def advantages(self, ro, rewards: Tensor, plan, trainer) -> AdvantageResult:
        return self.scoring.advantages(ro.images, rewards, plan, trainer)

    def metrics(self, ro, rewards: Tensor, plan) -> dict[str, float]:
        """What to log of the strategy this iteration (nothing here)."""
        return {}

    def end_iteration(self) -> None:
        """Move the state the strategy carries on to the next iteration (none here)."""

    def report(self, out: Path) -> None:
        """Write what people should see of the strategy into the run directory (nothing here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensors(self) -> dict[str, Tensor]:
        """The tensors the strategy carries across iterations, whole (none here)."""
        return {}

    def load_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        if tensors:
            raise ValueError(f"{where}: the checkpoint carries strategy tensors ({sorted(tensors)[:3]}...) that "
                             f"strategy {self.name} does not keep")


class FlowStrategy(Strategy):
    """Flow-GRPO's rollout of a flow-matching policy, which the other flow strategies change in parts: SDE on the
    steps of ``sde_mask``, every SDE step trained; advantages from the run's scoring."""

    kind = "flow"
    ode_solver = "euler"  # the deterministic steps after the SDE window

    def __init__(self, policy, options, sampling: Sampling, scoring: ImageScoring):
        super().__init__(policy, options, sampling, scoring)
        # CPS's last step (to sigma 0) has no noise, so it always runs as ODE
        self.usable = sampling.num_steps - 1 if sampling.sde_kind == "cps" else sampling.num_steps
        self.sigmas = policy.sigmas(sampling.num_steps)
        jitter = sampling.schedule_jitter
        self.fine = policy.sigmas(sampling.num_steps * jitter) if jitter else None

    def rollout(self, plan):
        """This process's rollouts: every row sampled on its own, stochastic where ``sde_mask`` says."""
        s, idx = self.sampling, plan.indices
        rows = plan.local_rows()
        sigmas = self.schedule(plan)
        mask = self.sde_mask(plan, len(sigmas) - 1)
        ro = self.policy.rollout([r["prompt"] for r in rows], rows, plan.group_ids[idx],
                                 initial_noise(s, plan, self.policy.latent_shape()), sigmas=sigmas,
                                 sde_mask=mask[idx] if mask.ndim == 2 else mask, guidance=s.guidance, kind=s.sde_kind,
                                 noise_level=self.noise_level(len(sigmas) - 1), noise=sde_noise(s, plan),
                                 noise_freqs=s.noise_freqs, ode_solver=self.ode_solver, keep_means=s.grpo_guard)
        ro.train_steps = self.train_steps(ro.sde_mask.expand(len(ro), len(sigmas) - 1), plan)
        return ro

    def update_batch(self, ro, adv: AdvantageResult) -> UpdateBatch:
        s = ro.train_steps.shape[1]
        dt = ro.sigmas[ro.train_steps] - ro.sigmas[ro.train_steps + 1]
        return UpdateBatch(ro, torch.ones(len(ro), s), adv.advantages, adv.valid, ro.trained_log_probs(), max_len=s,
                           ratio_norm=self.sampling.grpo_guard, step_dt=dt)

    def schedule(self, plan) -> Tensor:
        """The iteration's sigmas: the model's grid, or (schedule jitter) the fine grid at a shared random offset."""
        if self.fine is None:
            return self.sigmas
        offset = int(plan.rng(2).integers(1, self.sampling.schedule_jitter + 1))
        return offset_schedule(self.fine, self.sampling.num_steps, offset)

    def noise_level(self, num_steps: int) -> float | Tensor:
        """The SDE noise level: one for every step, or [T] per step."""
        return self.sampling.noise_level

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        """[T] (the same for every row) or [B, T] over the global batch: True where a step is stochastic."""
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[: min(self.sampling.sde_steps or self.sampling.num_steps, self.usable)] = True
        return mask

    def train_steps(self, sde_mask: Tensor, plan) -> Tensor:
        """[b, S] step indices each local row trains on: all its SDE steps (rows have the same count)."""
        counts = sde_mask.sum(dim=1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError(f"every row needs the same, nonzero number of SDE steps; got {sorted(set(counts.tolist()))}")
        return torch.nonzero(sde_mask)[:, 1].view(len(sde_mask), -1)
