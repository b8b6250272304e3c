"""Seconds per GRPO iteration on the shipped Shapes model, split into rollout, reward and update, for
several precisions and micro-batch sizes measured in one process (compare them as ratios).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --precisions fp32 bf16 \
        --micro-batches 24 48 --iterations 4 --out benchmarks/results/train_throughput.json

Every setting runs the `shapes` preset's iteration (rollout with the preset's strategy, the verifier reward, the
preset's advantages (Pref-GRPO win rates), one update with the KL reference) on the same prompts and noise, after
one warm-up iteration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flowgrpo.config import make_config
from flowgrpo.core import PromptStatTracker
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.rewards import build_judge, build_reward
from flowgrpo.samplers.rollout import group_noise
from flowgrpo.train import granular_advantages, load_policy, sample_groups, sde_mask_for
from flowgrpo.update import grpo_update, train_step_indices


def time_iterations(cfg, entries, reward_fn, judge, iterations: int) -> dict[str, float]:
    policy = load_policy(cfg)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    sigmas = policy.sigmas(cfg.num_steps)
    phases: dict[str, list[float]] = {"rollout": [], "reward+advantages": [], "update": [], "total": []}
    for i in range(iterations + 1):  # the first is a warm-up
        picked, gids = sample_groups(entries, cfg, rng, 0)
        t0 = time.perf_counter()
        x = group_noise(cfg.prompts_per_iter, cfg.group_size, policy.latent_shape(), generator=g, shared=cfg.shared_noise)
        ro = policy.rollout([e["prompt"] for e in picked], picked, gids, x, sigmas=sigmas,
                            sde_mask=sde_mask_for(cfg, gids, g), guidance=cfg.guidance, kind=cfg.sde_kind,
                            noise_level=cfg.noise_level, generator=g)
        t1 = time.perf_counter()
        rewards = reward_fn(ro.images, ro.prompts, ro.metadata)
        adv = granular_advantages(cfg, policy, ro, rewards, reward_fn, judge, PromptStatTracker())
        t2 = time.perf_counter()
        grpo_update(policy, optimizer, params, ro, adv, train_step_indices(ro, cfg, g), cfg)
        t3 = time.perf_counter()
        if i:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[k].append(v)
    return {k: statistics.median(v) for k, v in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[24, 48, 96])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32 and/or bf16")
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per setting (after a warm-up)")
    ap.add_argument("--out", type=Path, help="write the medians as JSON here")
    args = ap.parse_args()
    base = make_config("shapes")
    entries = load_prompts(base.prompts)
    reward_fn = build_reward(base.reward, **base.reward_options)
    judge = build_judge(base.judge, **base.judge_options) if base.judge else None
    results = {}
    for precision in args.precisions:
        for mb in args.micro_batches:
            name = f"{precision} micro_batch {mb}"
            cfg = replace(base, micro_batch=mb, precision=precision)
            results[name] = time_iterations(cfg, entries, reward_fn, judge, args.iterations)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in results[name].items()), flush=True)
    first = next(iter(results))
    for name, r in results.items():
        print(f"{name}: {r['total'] / results[first]['total']:.2f} x the time of {first}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "iterations": args.iterations,
                                        "median_seconds": results}, indent=1))


if __name__ == "__main__":
    main()
