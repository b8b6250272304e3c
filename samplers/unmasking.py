"""Iterative unmasking for masked diffusion models (MaskGIT / aMUSEd), as pure functions with explicit noise.

A state is a token grid ``tokens [B, N]`` whose masked positions hold ``mask_id``; generation starts fully masked
and ends fully committed after T steps. Step t, for each row, under its schedule values
(ratio, temperature, remask, cfg) — see ``SCHEDULE_VARIABLES``:

1. guided logits ``l = l_u + cfg (l_c - l_u)`` [B, N, V] at the current state;
2. a candidate token at every masked position from ``softmax(l / temperature)`` (Gumbel-max with the given noise);
3. confidence = ``log softmax(l)[candidate] + remask * gumbel`` (MaskGIT's choice temperature: 0 commits strictly
   the most confident, larger values commit more at random);
4. the ``commit_count`` most confident masked positions take their candidate; the others stay masked (their
   candidates are discarded: remasked). ``ratio`` is the fraction of the still-masked positions committed; the last
   step commits all that remain.

The step's token log-prob is the mean over its committed positions of ``log softmax(l / temperature)[token]``
(a per-token scale, like Flow-GRPO's mean over latent elements). Training recomputes it with
``committed_log_prob`` from the state ``tokens_at(final, commit_step, t)``, so a trajectory is stored as its final
tokens and the step at which each position was committed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowgrpo.samplers.noise import keyed_generator

SCHEDULE_VARIABLES = ("ratio", "temperature", "remask", "cfg")
RATIO, TEMPERATURE, REMASK, CFG = range(4)

__all__ = ["CFG", "RATIO", "REMASK", "SCHEDULE_VARIABLES", "TEMPERATURE", "UnmaskingTrajectory", "commit_count",
           "committed_log_prob", "cosine_ratios", "default_schedule", "guided_logits", "gumbel",
           "keyed_gumbels", "sample_unmasking", "token_log_probs", "tokens_at", "unmask_step"]


def gumbel(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise from uniforms in [0, 1) (clamped away from 0 and 1)."""
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1 - torch.finfo(uniform.dtype).eps)))


def keyed_gumbels(keys: Sequence[Sequence[int]], step: int, num_tokens: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(sampling noise [B, N, V], remasking noise [B, N]) of one step: row i from the generator keyed
    ``(*keys[i], step)``, so a sample's draws do not depend on the batch it is made in."""
    rows = [torch.rand(num_tokens * (vocab + 1), generator=keyed_generator(*k, step)) for k in keys]
    g = gumbel(torch.stack(rows)) if rows else torch.empty(0, num_tokens * (vocab + 1))
    return g[:, : num_tokens * vocab].view(-1, num_tokens, vocab), g[:, num_tokens * vocab:]


def guided_logits(cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
    """Classifier-free guidance on logits, one scale per row: ``uncond + scale (cond - uncond)``."""
    return uncond + scale.view(-1, *([1] * (cond.ndim - 1))) * (cond - uncond)


def commit_count(n_masked: Tensor, ratio: Tensor, last: bool) -> Tensor:
    """Positions to commit per row: ``round(ratio * n_masked)``, at least one while any remain; all on the last step."""
    if last:
        return n_masked
    return torch.minimum(n_masked, torch.round(ratio * n_masked).long().clamp(min=1))


def unmask_step(logits: Tensor, tokens: Tensor, mask_id: int, n_commit: Tensor, temperature: Tensor,
                remask: Tensor, sample_noise: Tensor, remask_noise: Tensor) -> tuple[Tensor, Tensor]:
    """One unmasking step (module doc): (next tokens [B, N], committed [B, N] bool)."""
    b, n, _ = logits.shape
    masked = tokens == mask_id
    candidate = (logits / temperature.view(-1, 1, 1) + sample_noise).argmax(dim=-1)
    confidence = torch.log_softmax(logits, dim=-1).gather(-1, candidate[..., None])[..., 0]
    confidence = (confidence + remask.view(-1, 1) * remask_noise).masked_fill(~masked, -math.inf)
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    committed = masked & (rank < n_commit.view(-1, 1))
    return torch.where(committed, candidate, tokens), committed


def token_log_probs(logits: Tensor, tokens: Tensor, committed: Tensor, temperature: Tensor) -> Tensor:
    """[B, N] ``log softmax(logits / temperature)[token]`` at committed positions, 0 elsewhere."""
    logp = torch.log_softmax(logits / temperature.view(-1, 1, 1), dim=-1)
    picked = logp.gather(-1, torch.where(committed, tokens, 0)[..., None])[..., 0]
    return picked * committed


def committed_log_prob(logits: Tensor, tokens: Tensor, committed: Tensor, temperature: Tensor) -> Tensor:
    """[B] the mean log-prob of the tokens committed in one step (0 for a row that committed none)."""
    return token_log_probs(logits, tokens, committed, temperature).sum(dim=1) / committed.sum(dim=1).clamp(min=1)


def tokens_at(final: Tensor, commit_step: Tensor, step: int | Tensor, mask_id: int) -> Tensor:
    """The state before ``step`` (one step, or one per row): the positions committed earlier, the rest masked."""
    step = torch.as_tensor(step, device=final.device).view(-1, 1)
    return torch.where(commit_step < step, final, torch.full_like(final, mask_id))


def cosine_ratios(num_steps: int) -> Tensor:
    """aMUSEd's cosine schedule as per-step ratios: after step t a fraction cos(pi/2 (t+1)/T) of the positions is
    still masked, so step t commits 1 - m(t) / m(t-1) of those masked before it (the last step: all)."""
    m = torch.cos(math.pi / 2 * torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
    ratios = 1 - m[1:] / m[:-1]
    ratios[-1] = 1.0
    return ratios.float()


def default_schedule(num_steps: int, guidance: float, remask: float = 2.0, temperature: float = 1.0) -> Tensor:
    """The hand-set schedule [T, 4]: cosine ratios, constant sampling temperature, remasking temperature falling
    linearly from ``remask`` to 0 (aMUSEd's default), constant CFG scale."""
    out = torch.empty(num_steps, len(SCHEDULE_VARIABLES))
    out[:, RATIO] = cosine_ratios(num_steps)
    out[:, TEMPERATURE] = temperature
    out[:, REMASK] = torch.linspace(remask, 0.0, num_steps)
    out[:, CFG] = guidance
    return out


@dataclass
class UnmaskingTrajectory:
    tokens: Tensor  # [B, N] final tokens
    commit_step: Tensor  # [B, N] long: the step at which each position was committed
    log_probs: Tensor  # [B, T] mean log-prob of the tokens committed at each step
    counts: Tensor  # [B, T] positions committed at each step


def sample_unmasking(logits_fn: Callable[[Tensor, int], Tensor], tokens: Tensor, mask_id: int, schedule: Tensor,
                     noise_fn: Callable[[int], tuple[Tensor, Tensor]]) -> UnmaskingTrajectory:
    """Unmask ``tokens`` [B, N] (fully masked) in T steps under ``schedule`` [B, T, 4] (per row, squashed values).

    ``logits_fn(tokens, t)`` gives the guided logits [B, N, V] at step t (the caller applies row r's CFG scale
    ``schedule[r, t, CFG]``); ``noise_fn(t)`` gives that step's (sampling, remasking) Gumbel noise.
    """
    b, num_steps = schedule.shape[0], schedule.shape[1]
    commit_step = torch.full(tokens.shape, num_steps, dtype=torch.long, device=tokens.device)
    log_probs = torch.zeros(b, num_steps, device=tokens.device)
    counts = torch.zeros(b, num_steps, dtype=torch.long, device=tokens.device)
    for t in range(num_steps):
        s = schedule[:, t].to(tokens.device)
        logits = logits_fn(tokens, t)
        n = commit_count((tokens == mask_id).sum(dim=1), s[:, RATIO], last=t == num_steps - 1)
        sample_noise, remask_noise = (x.to(tokens.device) for x in noise_fn(t))
        tokens, committed = unmask_step(logits, tokens, mask_id, n, s[:, TEMPERATURE], s[:, REMASK], sample_noise,
                                        remask_noise)
        log_probs[:, t] = committed_log_prob(logits, tokens, committed, s[:, TEMPERATURE])
        commit_step[committed] = t
        counts[:, t] = committed.sum(dim=1)
    return UnmaskingTrajectory(tokens, commit_step, log_probs, counts)
