"""G²RPO singular stochastic sampling as the paper computes it: a group is ONE row until its branch step.

The G members of a group share their initial noise and ODE path up to their branch step k, and the velocity at
x_k as well; only the SDE step at k differs between them (each member draws its own noise), after which each
member continues by ODE on its own row. So the shared prefix and the branch point are evaluated once per group:
for P groups of G members and a branch at k, the model sees k + 1 rows of the group and G (T - k - 1) of its
members, instead of G T.

Per step t the rows fall in three sets, each evaluated in its own calls: the groups branching at t (their
velocity is the one training differentiates, so it goes through ``exact_velocity_fn`` — the call structure the
update repeats — and the calls are recorded in ``branch_calls``), the groups still on their shared prefix and the
members of groups that branched earlier (both deterministic, evaluated together through ``velocity_fn``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.noise import KeyedNoise
from flowgrpo.samplers.rollout import Trajectory, check_sigmas
from flowgrpo.samplers.steps import SDE_STEPS, gaussian_log_prob, ode_step, sde_step

__all__ = ["BranchedTrajectory", "sample_branched"]


@dataclass
class BranchedTrajectory(Trajectory):
    """A `Trajectory` of member rows whose groups shared their prefix, plus how the branch
    velocities were evaluated: ``branch_calls`` lists, in call order, (step t, the groups of one call)."""

    branch_calls: list[tuple[int, Tensor]] | None = None


GroupVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def sample_branched(
    velocity_fn: GroupVelocityFn,
    exact_velocity_fn: GroupVelocityFn,
    x_groups: Tensor,
    sigmas: Tensor,
    branch: Tensor,
    member_group: Tensor,
    *,
    noise: KeyedNoise,
    kind: str = "flow_sde",
    noise_level: float = 0.7,
    noise_freqs: int = 0,
    call_size: int,
    keep_means: bool = False,
) -> BranchedTrajectory:
    """Sample the member rows of P groups that branch once each.

    Args:
        velocity_fn, exact_velocity_fn: ``(x [n, ...], sigma [n], groups [n]) -> v`` (``groups``: the group each row
            belongs to, for its conditioning); the exact one gives the branch velocities (training recomputes them
            with the same calls).
        x_groups: initial latents ``[P, ...]``, one per group.
        sigmas: schedule ``[T + 1]``.
        branch: ``[P]`` the step at which each group branches.
        member_group: ``[B]`` the group (0..P-1) of each member row.
        noise: per-member keyed SDE noise (B rows).
        call_size: groups per exact call (the policy's micro-batch): the update repeats the calls chunk by chunk.
        keep_means: also return each member's branch-step mean (``Trajectory.means``, 0 at its ODE steps).
    """
    check_sigmas(sigmas)
    p, t_total, b = x_groups.shape[0], sigmas.numel() - 1, member_group.shape[0]
    if branch.shape != (p,) or bool((branch < 0).any()) or bool((branch >= t_total).any()):
        raise ValueError(f"branch must be [P] = [{p}] steps in [0, {t_total}), got {branch.tolist()}")
    if member_group.ndim != 1 or bool((member_group < 0).any()) or bool((member_group >= p).any()):
        raise ValueError(f"member_group must be [B] group indices in [0, {p})")
    if len(noise) != b:
        raise ValueError(f"noise has {len(noise)} rows for {b} members")
    if kind not in SDE_STEPS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {sorted(SDE_STEPS)}")
    member_group = member_group.to(x_groups.device)
    sigmas_dev = sigmas.to(x_groups.device)
    sigma_max = float(sigmas[1])
    members = torch.arange(b, device=x_groups.device)
    shared = x_groups.clone()  # each group's row while it is still on its shared path
    x = torch.empty((b, *x_groups.shape[1:]), dtype=x_groups.dtype, device=x_groups.device)  # members after branching
    latents = torch.empty((b, t_total + 1, *x_groups.shape[1:]), dtype=x_groups.dtype, device=x_groups.device)
    latents[:, 0] = x_groups[member_group]
    log_probs = torch.zeros(b, t_total, device=x_groups.device)
    means = torch.zeros((b, t_total, *x_groups.shape[1:]), dtype=torch.float32, device=x_groups.device) \
        if keep_means else None
    branch_dev = branch.to(x_groups.device)
    calls: list[tuple[int, Tensor]] = []
    for t in range(t_total):
        sigma, sigma_next = sigmas_dev[t], sigmas_dev[t + 1]
        prefix = torch.nonzero(branch_dev > t).flatten()  # groups still on their shared path
        branching = torch.nonzero(branch_dev == t).flatten()
        after = members[branch_dev[member_group] < t]  # members of groups that branched
        # deterministic rows, one evaluation for all of them
        rows = torch.cat([shared[prefix], x[after]])
        if len(rows):
            v = velocity_fn(rows, sigma.expand(len(rows)), torch.cat([prefix, member_group[after]]))
            stepped = ode_step(rows, v, sigma, sigma_next)
            shared[prefix], x[after] = stepped[: len(prefix)], stepped[len(prefix):]
        # the branch: one exact velocity per group, one SDE step per member
        for start in range(0, len(branching), call_size):
            groups = branching[start : start + call_size]
            calls.append((t, groups.cpu()))
            xg = shared[groups]
            v = exact_velocity_fn(xg, sigma.expand(len(groups)), groups)
            rows_of = torch.nonzero(torch.isin(member_group, groups)).flatten()
            slot = torch.searchsorted(groups, member_group[rows_of])  # groups are ascending
            x_rep, v_rep = xg[slot], v[slot]
            shape = (x_rep.shape[1], noise_freqs, noise_freqs) if noise_freqs else x_rep.shape[1:]
            eps = noise(t, shape, rows=torch.isin(members, rows_of).cpu(), device=x_rep.device)[rows_of.cpu()]
            x_next, mean, std = sde_step(kind, x_rep, v_rep, sigma, sigma_next, noise_level, sigma_max=sigma_max,
                                         noise=eps, noise_freqs=noise_freqs)
            x[rows_of] = x_next.to(x.dtype)
            log_probs[rows_of, t] = gaussian_log_prob(x_next, mean, std, noise_freqs)
            if means is not None:
                means[rows_of, t] = mean.float()
        # record every member's state after step t: shared rows for groups still on their path
        on_path = branch_dev[member_group] > t
        latents[:, t + 1] = torch.where(on_path.view(-1, *([1] * (x.ndim - 1))), shared[member_group], x)
    return BranchedTrajectory(latents=latents, log_probs=log_probs,
                              sde_mask=torch.nn.functional.one_hot(branch[member_group.cpu()].cpu(), t_total).bool(),
                              sigmas=sigmas.clone(), kind=kind, noise_level=float(noise_level),
                              noise_freqs=noise_freqs, means=means, branch_calls=calls)
