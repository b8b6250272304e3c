"""The one PPO-clip update of every trainer: images (SDE steps) and text (tokens) alike.

A process's share of an iteration is a grid of elements (rows x steps): the trained SDE steps of each image, or the
completion tokens of each text. The policy (or the batch's own ``elements``, e.g. G²RPO's branch calls) cuts it
into chunks (``chunks``: rows x a slice of step columns, each one forward pass, as its sampler evaluated them) and
evaluates them through three callbacks: ``log_prob`` (with gradient), ``reference_out`` (the frozen reference, only
when beta > 0) and ``kl``. Each optimizer step first builds its loss weights W from the masks of ALL its rows on ALL
processes, so its gradient is that of the whole global batch, whatever the micro-batch size, the order of the
backward passes or the number of processes (DDP averages gradients over ranks, so each rank scales its loss by the
number of ranks).

Forward-process strategies (DiffusionNFT) train an objective of their own in place of PPO-clip: their elements
give ``loss(rollout, chunk, advantages)`` (the per-element loss and the KL's input) and the update weighs, reduces and
steps it exactly as it does the PPO-clip loss. Elements may add a ``penalty(rollout, chunk, kl_in)`` per element
(AWM's proximal term to a lagged copy of the weights). With ``batch.ratio_norm`` (GRPO-Guard) the PPO ratio of a
Gaussian step is normalised: its elements give ``mean_shift(rollout, chunk, kl_in)``, the squared shift of the step
mean from the sampler's and the step's std. Under flow_grpo's KL convention (`--kl-convention flow_grpo`, image
SDE steps) the KL of each element is the exact one times its step's |dt| (``batch.step_dt``).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from flowgrpo.core import loss_weights, normalised_log_ratio, ppo_clip_loss
from flowgrpo.distributed import Dist
from flowgrpo.policies.chunks import UpdateBatch
from flowgrpo.settings import BatchLayout, GRPOSettings


def _global_weights(batch: UpdateBatch, cfg: GRPOSettings, layout: BatchLayout, dist: Dist) -> list[Tensor]:
    """Per optimizer step, this process's rows of W [rows_per_step, S] (scaled by the world size for DDP)."""
    b, s = batch.mask.shape
    padded = torch.zeros(b, batch.max_len, dtype=torch.float32)
    padded[:, :s] = batch.mask.float().cpu() * batch.valid.float().cpu()[:, None]
    everyone = dist.gather(padded.to(dist.device)).cpu().view(dist.world_size, b, batch.max_len)
    rps, out = layout.rows_per_step, []
    for o in range(layout.optimizer_steps):
        step_mask = everyone[:, o * rps : (o + 1) * rps].reshape(-1, batch.max_len)
        w = loss_weights(step_mask, cfg.loss_agg, max_len=batch.max_len)
        mine = w.view(dist.world_size, rps, batch.max_len)[dist.rank, :, :s]
        out.append(mine * dist.world_size)
    return out


def ppo_update(policy, optimizer: torch.optim.Optimizer, module: torch.nn.Module, batch: UpdateBatch,
               cfg: GRPOSettings, layout: BatchLayout, dist: Dist) -> dict[str, float]:
    """``cfg.inner_epochs`` passes of ``layout.optimizer_steps`` PPO-clip optimizer steps over this process's rows.

    ``module`` is the (possibly DDP-wrapped) trained module: gradients are reduced over processes on the last
    backward pass of each optimizer step only. Returns metrics over all processes.
    """
    weights = _global_weights(batch, cfg, layout, dist)
    params = policy.trainable_parameters()
    elements = batch.elements or policy
    own_loss, penalty = getattr(elements, "loss", None), getattr(elements, "penalty", None)
    device = batch.mask.device
    old = batch.sampled_logp.detach().clone()
    ref_cache: dict[tuple, Any] = {}
    sums: dict[str, float] = defaultdict(float)
    ratio_min, ratio_max = math.inf, -math.inf
    rps = layout.rows_per_step
    for epoch in range(cfg.inner_epochs):
        for o in range(layout.optimizer_steps):
            w_step = weights[o].to(device)
            chunks = elements.chunks(batch.rollout, slice(o * rps, (o + 1) * rps), layout.micro_batch)
            for n, chunk in enumerate(chunks):
                rows, cols = chunk.rows.to(device), chunk.cols
                with dist.no_sync(module, skip=n < len(chunks) - 1):
                    active = batch.mask[rows, cols] != 0
                    adv = batch.advantages[rows] if batch.advantages.ndim == 1 else batch.advantages[rows, cols]
                    if own_loss is not None:
                        elem, kl_in = own_loss(batch.rollout, chunk, adv)
                        st = None
                    else:
                        logp, kl_in = elements.log_prob(batch.rollout, chunk)
                        if epoch == 0:
                            sums["logp_diff"] = max(sums["logp_diff"], float(
                                ((logp.detach() - batch.sampled_logp[rows, cols]).abs() * active).max().cpu()))
                            if batch.recompute_old:
                                old[rows, cols] = logp.detach()
                        log_ratio = None
                        if batch.ratio_norm:
                            log_ratio = normalised_log_ratio(logp, old[rows, cols], *elements.mean_shift(
                                batch.rollout, chunk, kl_in))
                        elem, st = ppo_clip_loss(logp, old[rows, cols], adv, cfg.clip_low, cfg.clip_high, mask=active,
                                                 log_ratio=log_ratio)
                    if penalty is not None:
                        elem = elem + penalty(batch.rollout, chunk, kl_in)
                    w = w_step[rows - o * rps, cols]
                    if cfg.beta > 0:
                        if chunk.key not in ref_cache:
                            with torch.no_grad():
                                ref_cache[chunk.key] = elements.reference_out(batch.rollout, chunk)
                        kl = elements.kl(kl_in, ref_cache[chunk.key])
                        if getattr(cfg, "kl_convention", "exact") == "flow_grpo":
                            kl = kl * batch.step_dt[rows, cols].to(kl.device, kl.dtype)
                        elem = elem + cfg.beta * kl
                        if epoch == 0:
                            sums["kl"] += float((w * kl.detach()).sum()) / dist.world_size
                    loss = (w * elem).sum()
                    loss.backward()
                n_active = int(active.sum())
                if n_active and st is not None:
                    sums["clip_active"] += float(st["clip_frac"]) * n_active
                    sums["elements"] += n_active
                    ratio_min, ratio_max = min(ratio_min, float(st["ratio_min"])), max(ratio_max, float(st["ratio_max"]))
                if epoch == 0:
                    sums["loss"] += float(loss.detach()) / dist.world_size
            sums["grad_norm"] += dist.clip_grad_norm(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return _reduce_stats(sums, ratio_min, ratio_max, cfg, layout, dist)


def _reduce_stats(sums: dict[str, float], ratio_min: float, ratio_max: float, cfg: GRPOSettings,
                  layout: BatchLayout, dist: Dist) -> dict[str, float]:
    """Metrics over all processes: sums of the loss and KL (W already splits them), element-weighted clip
    fraction, extreme ratios, and the largest gap between sampled and recomputed log-probs."""
    t = torch.tensor([sums["loss"], sums["kl"], sums["clip_active"], sums["elements"]], dtype=torch.float64)
    loss, kl, clipped, elements = dist.all_reduce(t.to(dist.device)).cpu().tolist()
    ext = torch.tensor([-ratio_min, ratio_max, sums["logp_diff"]], dtype=torch.float64)
    neg_min, r_max, logp_diff = dist.all_reduce(ext.to(dist.device), "max").cpu().tolist()
    out = {"loss": loss, "clip_frac": clipped / elements if elements else math.nan,
           "ratio_min": -neg_min if elements else math.nan, "ratio_max": r_max if elements else math.nan,
           "sampler_logp_max_diff": logp_diff,
           "grad_norm": sums["grad_norm"] / (cfg.inner_epochs * layout.optimizer_steps)}
    if cfg.beta > 0:
        out["kl"] = kl / layout.optimizer_steps
    return out
