"""Seconds per GRPO iteration, and its ratio to the model-compute floor measured in the same process.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --settings preset flow_grpo:2x2x32 \
        flow_grpo:6x6x32 --iterations 4 --out benchmarks/results/train_throughput.json

Settings:
- ``preset``: the `shapes` preset's iteration on the shipped model (G²RPO branches, Pref-GRPO win rates from the
  verifier, the KL reference), split into rollout, reward + advantages and update.
- ``STRATEGY:LxHxD``: a fresh Shapes SD3 transformer with L layers and H heads of size D (2x2x32: 0.3M parameters,
  6x6x32: 7.8M), G = 8 samples of 2 prompts, 10 steps, CFG 4.5, every SDE step trained, no KL, a brightness reward
  (model compute is what is compared), precision ``--precision``.

The floor is the model work the maths needs, each phase one transformer call: sampling (one forward of both CFG
branches per step), then per trained step one no-grad unconditional forward and one conditional forward and backward,
then one optimizer step — for G²RPO over one row per group up to and including its branch point, with the same
branch steps as the trainer's iteration; with a KL (the preset) the reference forwards of the trained steps too.
It is timed with the same transformer calls, alternating with the trainer's iterations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from flowgrpo.config import make_config
from flowgrpo.distributed import Dist
from flowgrpo.pretrain.model import TransformerSpec, build_pipeline
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.rewards import Reward, register_reward
from flowgrpo.train import build_trainer, draw_prompts

PHASES = {"rollout": "time_rollout", "reward+advantages": "time_reward", "update": "time_train",
          "total": "seconds_per_iter"}


class Brightness(Reward):
    """Mean pixel value: a reward that costs nothing next to the model."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


register_reward("brightness", Brightness, overwrite=True)


def setting_config(name: str, precision: str, out: str):
    """The preset, or a tiny-transformer Flow-GRPO setting ``STRATEGY:LxHxD`` (its pipeline written under ``out``)."""
    base = replace(make_config("shapes"), out=out, log_with="", precision=precision)
    if name == "preset":
        return base
    strategy, size = name.split(":")
    layers, heads, dim = (int(v) for v in size.split("x"))
    path = Path(out) / f"model-{size}"
    build_pipeline(TransformerSpec(num_layers=layers, num_attention_heads=heads, attention_head_dim=dim)).save_pretrained(path)
    return replace(base, model=str(path), strategy=strategy, strategy_options={}, sde_steps=0, prompts_per_iter=2, group_size=8,
                   micro_batch=16, num_steps=10, guidance=4.5, beta=0.0, judge="", reward="brightness")


def _cfg_velocity(policy, x, sigma, cond, neg, guidance, *, grad: bool = False, transformer=None):
    """CFG velocity with the unconditional branch without gradient (both in one call when nothing trains)."""
    tr = transformer or policy.transformer
    if not grad:
        with torch.no_grad():
            both = {k: torch.cat([cond[k], neg[k]]) for k in cond}
            v = policy._call(tr, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            return v[len(x):] + guidance * (v[: len(x)] - v[len(x):])
    with torch.no_grad():
        v_u = policy._call(tr, x, sigma, neg)
    return v_u + guidance * (policy._call(tr, x, sigma, cond) - v_u)


def floor_step(policy, optimizer, cfg, prompts: list[str], branch: torch.Tensor | None) -> float:
    """Seconds of the floor's model work for one iteration of ``cfg`` on ``prompts`` (one per sample). Flow-GRPO:
    every step sampled for every sample and trained. G²RPO (``branch`` [P], each group's branch step): a group's
    prefix and branch point are one row, the rest one row per member; one trained step per group. With beta > 0
    the trained steps' reference forwards count too."""
    t0 = time.perf_counter()
    g = cfg.group_size
    cond, neg = policy.cond(prompts), policy.negative_cond(len(prompts))
    sigmas = policy.sigmas(cfg.num_steps)
    x = torch.randn((len(prompts), *policy.latent_shape()))
    if branch is None:  # every row at every step
        rows_at = [torch.arange(len(prompts))] * cfg.num_steps
        trained = [(i, torch.arange(len(prompts))) for i in range(cfg.num_steps)]
    else:  # one row per group until its branch step, then its members
        first = torch.arange(0, len(prompts), g)
        b = branch.repeat_interleave(g)
        rows_at = [torch.cat([first[branch >= i], torch.nonzero(b < i).flatten()]) for i in range(cfg.num_steps)]
        trained = [(i, first[branch == i]) for i in range(cfg.num_steps) if (branch == i).any()]
    xs = []
    for i, rows in enumerate(rows_at):
        xs.append(x.clone())
        s = sigmas[i].expand(len(rows))
        x[rows] = x[rows] + (sigmas[i + 1] - sigmas[i]) * _cfg_velocity(policy, x[rows], s, {k: c[rows] for k, c in cond.items()},
                                                                      {k: c[rows] for k, c in neg.items()}, cfg.guidance)
    for i, rows in trained:
        s, c, n = sigmas[i].expand(len(rows)), {k: v[rows] for k, v in cond.items()}, {k: v[rows] for k, v in neg.items()}
        (_cfg_velocity(policy, xs[i][rows], s, c, n, cfg.guidance, grad=True) * xs[i][rows]).mean().backward()
        if cfg.beta > 0:
            with policy.reference() as ref:
                _cfg_velocity(policy, xs[i][rows], s, c, n, cfg.guidance, transformer=ref)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(name: str, precision: str, iterations: int, dist: Dist) -> dict:
    cfg = setting_config(name, precision, tempfile.mkdtemp())
    trainer = build_trainer(cfg, dist)
    task = trainer.task
    entries = load_prompts(cfg.prompts)
    times: dict[str, list[float]] = {k: [] for k in (*PHASES, "floor")}
    for i in range(iterations + 1):  # the first of each is a warm-up
        rows = draw_prompts(entries, cfg, i)
        branch = task.branch_steps(trainer.plan(rows)) if cfg.strategy == "g2rpo" else None
        metrics = trainer.step(rows)
        floor = floor_step(task.policy, trainer.optimizer, cfg, [r["prompt"] for r in rows for _ in range(cfg.group_size)],
                           branch)
        if i:
            for k, key in PHASES.items():
                times[k].append(metrics[key])
            times["floor"].append(floor)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio_to_floor"] = out["total"] / out["floor"]
    out["parameters"] = sum(p.numel() for p in task.policy.transformer.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["preset", "flow_grpo:2x2x32", "flow_grpo:6x6x32"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per setting (after a warm-up)")
    ap.add_argument("--out", type=Path, help="write the medians as JSON here")
    args = ap.parse_args()
    dist = Dist.create()
    results = {}
    for name in args.settings:
        r = results[name] = measure(name, args.precision, args.iterations, dist)
        print(f"{name} ({r['parameters'] / 1e6:.1f}M parameters, {args.precision}): " +
              ", ".join(f"{k} {r[k]:.3f} s" for k in (*PHASES, "floor")) +
              f"; {r['ratio_to_floor']:.2f} x the floor", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "iterations": args.iterations,
                                        "precision": args.precision, "median_seconds": results}, indent=1))


if __name__ == "__main__":
    main()
