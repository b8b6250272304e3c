"""Seconds per GRPO iteration on the shipped Shapes model, split into rollout, reward + advantages and update, for
several precisions and micro-batch sizes measured in one process (compare them as ratios).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --precisions fp32 bf16 \
        --micro-batches 24 48 --iterations 4 --out benchmarks/results/train_throughput.json

Every setting runs the `shapes` preset's iteration through the trainer (`Trainer.step`: rollout with the preset's
strategy, the verifier reward, the preset's advantages (Pref-GRPO win rates), one update with the KL reference) on
the same prompts and noise, after one warm-up iteration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from flowgrpo.config import make_config
from flowgrpo.distributed import Dist
from flowgrpo.flow_task import FlowTask
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.rewards import build_judge, build_reward
from flowgrpo.strategies import STRATEGIES
from flowgrpo.train import draw_prompts, load_policy
from flowgrpo.trainer import Trainer, settings_json

PHASES = {"rollout": "time_rollout", "reward+advantages": "time_reward", "update": "time_train",
          "total": "seconds_per_iter"}


def time_iterations(cfg, entries, dist: Dist, iterations: int) -> dict[str, float]:
    task = FlowTask(load_policy(cfg), cfg, build_reward(cfg.reward, **cfg.reward_options),
                    build_judge(cfg.judge, **cfg.judge_options) if cfg.judge else None, STRATEGIES[cfg.strategy](cfg))
    trainer = Trainer(task, cfg, dist, config_json=settings_json(cfg))
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(iterations + 1):  # the first is a warm-up
        metrics = trainer.step(draw_prompts(entries, cfg, i))
        if i:
            for k, key in PHASES.items():
                times[k].append(metrics[key])
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[24, 48, 96])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32 and/or bf16")
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per setting (after a warm-up)")
    ap.add_argument("--out", type=Path, help="write the medians as JSON here")
    args = ap.parse_args()
    base = replace(make_config("shapes"), out=tempfile.mkdtemp(), log_with="")
    entries = load_prompts(base.prompts)
    dist = Dist.create()
    results = {}
    for precision in args.precisions:
        for mb in args.micro_batches:
            name = f"{precision} micro_batch {mb}"
            cfg = replace(base, micro_batch=mb, precision=precision)
            results[name] = time_iterations(cfg, entries, dist, args.iterations)
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
