"""G²RPO singular stochastic sampling: each group shares its ODE path up to one branch step (uniform in the window),
where each member takes one SDE step; optional multi-granularity advantages (coarser ODE finishes, summed).

A group is evaluated as one row up to and including its branch point (`flowgrpo.samplers.branched`), so training
needs one forward per group: the branch calls are recorded with the rollout, and the update repeats them exactly
(`BranchElements`), which keeps the importance ratio at 1 before the first update.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from flowgrpo.core import TRACKED_ESTIMATORS, AdvantageResult
from flowgrpo.policies.chunks import Chunk, UpdateBatch
from flowgrpo.policies.flow import Rollout
from flowgrpo.samplers.branched import sample_branched
from flowgrpo.samplers.rollout import check_int, check_sigmas, sample_trajectory
from flowgrpo.samplers.steps import gaussian_log_prob, transition_mean_std
from flowgrpo.strategies.base import FlowStrategy, RunContext, Sampling, initial_noise, option, sde_noise


@dataclass(frozen=True)
class G2RPOOptions:
    granularities: int = option(1, "multi-granularity: also finish each branch by ODE on every 2nd, ..., n-th later "
                                   "sigma and sum the n advantages (each normalised in its groups)")


@dataclass
class BranchedRollout(Rollout):
    """Rollouts computed per group: the branch calls (step, groups) as sampled, and each row's group."""

    branch_calls: list[tuple[int, Tensor]] | None = None
    member_group: Tensor | None = None


def coarse_tail(sigmas: Tensor, branch_step: int, granularity: int) -> Tensor:
    """The ODE schedule that finishes a branch taken at ``branch_step`` = k, from σ[k+1] over every
    ``granularity``-th later sigma: ``σ[k+1], σ[k+2], σ[k+2+λ], …, 0`` (σ[k+1] ++ σ[k+2::λ]). When σ[k+2::λ] does
    not end at 0, its last point becomes 0: the step before it goes to 0 directly, as G²RPO's code (bcmi/Granular-GRPO,
    train_g2rpo_hps.py) finishes a coarse branch, not one more short step. Granularity 1 is the sampling schedule; a
    branch at the last step leaves ``[0.]``, nothing to integrate.
    """
    check_sigmas(sigmas)
    check_int("granularity", granularity)
    num_steps = sigmas.numel() - 1
    if isinstance(branch_step, bool) or not isinstance(branch_step, int) or not 0 <= branch_step < num_steps:
        raise ValueError(f"branch_step must be an int in [0, {num_steps}), got {branch_step!r}")
    tail = sigmas[branch_step + 1 :]
    keep = torch.cat([tail[:1], tail[1::granularity]])
    keep[-1] = 0.0
    return torch.unique_consecutive(keep)


@torch.no_grad()
def finish_coarse(policy, ro: Rollout, granularity: int) -> Tensor:
    """Images of every row's branch (its one SDE step) finished by ODE on the `coarse_tail` schedule of this
    granularity, [B, 3, H, W]."""
    mask = ro.sde_mask.expand(len(ro), ro.sde_mask.shape[-1])
    if not bool((mask.sum(dim=1) == 1).all()):
        raise ValueError("multi-granularity finishing needs exactly one SDE (branch) step per row")
    branch = mask.float().argmax(dim=1)
    images = torch.empty_like(ro.images)
    for k in branch.unique().tolist():
        rows = torch.nonzero(branch == k).flatten()
        tail, x = coarse_tail(ro.sigmas, k, granularity), ro.latents[rows, k + 1]
        if len(tail) > 1:
            velocity = policy.velocity_fn(policy.cond([ro.prompts[i] for i in rows]), ro.guidance)
            x = sample_trajectory(velocity, x, tail, sde_mask=torch.zeros(len(tail) - 1, dtype=torch.bool),
                                  generator=None).latents[:, -1]
        images[rows] = policy.decode(x)
    return images


class BranchElements:
    """The trained elements of a `BranchedRollout` as sampled: each branch call with the members of its groups, the
    velocity at each group's shared x_t from one call, then each member's own step density."""

    def __init__(self, policy):
        self.policy = policy

    def chunks(self, ro: BranchedRollout, rows: slice, micro_batch: int) -> list[Chunk]:
        local = torch.arange(rows.start, rows.stop)
        out = []
        for j, (t, groups) in enumerate(ro.branch_calls):
            members = local[torch.isin(ro.member_group[local], groups)]
            if len(members):
                out.append(Chunk(members, slice(0, 1), ("branch", j), (t, groups)))
        return out

    def log_prob(self, ro: BranchedRollout, chunk: Chunk, *, transformer=None, grad: bool = True):
        """log-probs [n, 1] of the chunk's members, and (mean, std) of their steps for the KL."""
        policy, (t, groups) = self.policy, chunk.call
        first = torch.stack([torch.nonzero(ro.member_group == g).flatten()[0] for g in groups.tolist()])
        x = ro.latents[first, t]
        sigma, sigma_next = ro.sigmas[t].to(x.device), ro.sigmas[t + 1].to(x.device)
        cond = policy.cond([ro.prompts[int(i)] for i in first])
        v = policy.velocity(x, sigma.expand(len(first)), cond, ro.guidance, transformer=transformer, grad=grad)
        mean, std = transition_mean_std(ro.kind, x, v, sigma, sigma_next, ro.level(torch.tensor([t])),
                                        sigma_max=float(ro.sigmas[1]), noise_freqs=ro.noise_freqs)
        slot = torch.searchsorted(groups.to(x.device), ro.member_group[chunk.rows].to(x.device))
        logp = gaussian_log_prob(ro.latents[chunk.rows, t + 1], mean[slot], std, ro.noise_freqs)
        return logp[:, None], (mean[slot], std)

    def reference_out(self, ro: BranchedRollout, chunk: Chunk) -> Tensor:
        with self.policy.reference() as ref:
            return self.log_prob(ro, chunk, transformer=ref, grad=False)[1][0]

    def kl(self, kl_in, ref_mean: Tensor) -> Tensor:
        return self.policy.kl(kl_in, ref_mean)

    def mean_shift(self, ro: BranchedRollout, chunk: Chunk, kl_in) -> tuple[Tensor, Tensor]:
        return self.policy.mean_shift(ro, chunk, kl_in)  # a member trains its branch step, train_steps[:, 0]


class G2RPO(FlowStrategy):
    """G²RPO singular stochastic sampling: each group shares its ODE path up to one branch step (random in the
    window, sde_steps; 0 = the first half) where each member takes one SDE step, then ODE."""

    name = "g2rpo"
    Options = G2RPOOptions

    @classmethod
    def check(cls, options: G2RPOOptions, sampling: Sampling, run: RunContext) -> None:
        if options.granularities < 1:
            raise ValueError(f"g2rpo.granularities must be >= 1, got {options.granularities}")
        if not sampling.shared_noise:
            raise ValueError("strategy g2rpo branches each group from one shared ODE path: it needs shared_noise=true")
        if run.sharding == "fsdp":
            raise ValueError("sharding fsdp needs the same forward passes on every process; g2rpo evaluates each "
                             "process's groups in calls of their own (use ddp, or another strategy)")
        if options.granularities > 1 and run.advantage in TRACKED_ESTIMATORS and not run.judge:
            raise ValueError(f"advantage {run.advantage!r} keeps per-prompt statistics; it cannot be computed once "
                             f"per granularity (g2rpo.granularities={options.granularities})")

    def branch_steps(self, plan) -> Tensor:
        """[n_groups] each group's branch step, uniform in the window."""
        s = self.sampling
        window = min(s.sde_steps or max(s.num_steps // 2, 1), self.usable)
        return torch.from_numpy(plan.rng(1).integers(window, size=int(plan.group_ids.max()) + 1))

    def sde_mask(self, plan, num_steps: int) -> Tensor:
        return torch.nn.functional.one_hot(self.branch_steps(plan)[plan.group_ids], num_steps).to(torch.bool)

    def rollout(self, plan) -> BranchedRollout:
        """The rows of a group (same group id) share their initial noise and their path up to the group's branch
        step; each takes one SDE step there."""
        s, policy, idx = self.sampling, self.policy, plan.indices
        rows = plan.local_rows()
        prompts, group_ids = [r["prompt"] for r in rows], plan.group_ids[idx]
        groups = torch.unique_consecutive(group_ids)  # this process's groups (or parts of groups), in row order
        _, member_group = torch.unique_consecutive(group_ids, return_inverse=True)
        firsts = torch.nonzero(torch.cat([torch.tensor([True]), member_group[1:] != member_group[:-1]])).flatten()
        cond = policy.cond([prompts[int(i)] for i in firsts])
        x_groups = initial_noise(s, plan, policy.latent_shape(), groups)
        traj = sample_branched(policy.velocity_fn(cond, s.guidance, exact=False), policy.velocity_fn(cond, s.guidance),
                               x_groups.to(policy.device), self.schedule(plan), self.branch_steps(plan)[groups],
                               member_group, noise=sde_noise(s, plan), kind=s.sde_kind, noise_level=s.noise_level,
                               noise_freqs=s.noise_freqs, call_size=policy.micro_batch, keep_means=s.grpo_guard)
        ro = BranchedRollout(prompts, rows, group_ids, traj.latents, traj.log_probs, traj.sde_mask, traj.sigmas,
                             s.sde_kind, s.noise_level, policy.decode(traj.latents[:, -1]), s.noise_freqs, s.guidance,
                             means=traj.means, branch_calls=traj.branch_calls, member_group=member_group)
        ro.train_steps = self.train_steps(ro.sde_mask, plan)
        return ro

    def advantages(self, ro, rewards: Tensor, plan, trainer) -> AdvantageResult:
        """The sampled images' advantages plus (multi-granularity) those of the same branches finished on each
        coarser ODE schedule: the unclipped sum, clipped once at adv_clip as G²RPO's code clamps it; a row is valid
        only if it is valid at every granularity."""
        if self.options.granularities == 1:
            return super().advantages(ro, rewards, plan, trainer)
        adv = self.scoring.advantages(ro.images, rewards, plan, trainer, clip=False)
        total, valid, stats = adv.advantages.clone(), adv.valid.clone(), dict(adv.stats)
        for lam in range(2, self.options.granularities + 1):
            coarse = replace(ro, images=finish_coarse(self.policy, ro, lam))
            r = self.score(coarse, plan)
            a = self.scoring.advantages(coarse.images, r, plan, trainer, clip=False)
            total, valid = total + a.advantages, valid & a.valid
            stats[f"reward_granularity{lam}"] = float(plan.gather(r.double()).nanmean())
        total = torch.where(valid, total, torch.zeros_like(total))
        c = trainer.cfg.adv_clip
        if c:
            everyone, kept = plan.gather(total.double()), plan.gather(valid.double()) > 0
            stats["frac_clipped"] = float((everyone.abs() > c)[kept].double().mean()) if bool(kept.any()) else 0.0
            total = total.clamp(-c, c)
        return AdvantageResult(total, valid, stats)

    def update_batch(self, ro: BranchedRollout, adv: AdvantageResult) -> UpdateBatch:
        return replace(super().update_batch(ro, adv), elements=BranchElements(self.policy))
