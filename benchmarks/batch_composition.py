"""Does a row's velocity depend on how many rows share its forward pass? Measured on the shipped Shapes model.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/batch_composition.py --rows 1 3 8 12 \
        --out benchmarks/results/batch_composition.json

The preset's micro-batch (24 rows, distinct latents, one prompt each) is evaluated whole, then its first m rows
alone. For each precision and m: the largest velocity difference, and the importance ratio of a G²RPO branch step
(noise level 1.2 at each step of the preset's SDE window) sampled with the whole batch's velocity and recomputed
with the m-row one. This is why training recomputes log-probs with the rollout's batch composition, and why a
G²RPO group's shared ODE prefix is not evaluated once per group (one row instead of eight).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowgrpo.config import TrainConfig, make_config
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.samplers.steps import gaussian_log_prob, sde_step, transition_mean_std

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def measure(policy: FlowPolicy, cfg: TrainConfig, rows: list[int], steps: int, seed: int) -> dict[int, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [e["prompt"] for e in load_split("train")[: cfg.micro_batch]]
    x = torch.randn((len(prompts), *policy.latent_shape()), generator=g)
    cond, sigmas = policy.cond(prompts), policy.sigmas(cfg.num_steps)
    out = {m: {"max_abs_velocity_diff": 0.0, "max_abs_ratio_minus_1": 0.0} for m in rows}
    for i in range(steps):
        sigma = sigmas[i].expand(len(prompts))
        v_all = policy.velocity(x, sigma, cond, cfg.guidance)
        x_next, mean, std = sde_step(cfg.sde_kind, x, v_all, sigmas[i], sigmas[i + 1], cfg.noise_level,
                                     sigma_max=float(sigmas[1]), generator=g)
        sampled = gaussian_log_prob(x_next, mean, std)
        for m in rows:
            v_m = policy.velocity(x[:m], sigma[:m], {k: c[:m] for k, c in cond.items()}, cfg.guidance)
            recomputed = gaussian_log_prob(x_next[:m], *transition_mean_std(
                cfg.sde_kind, x[:m], v_m, sigmas[i], sigmas[i + 1], cfg.noise_level, sigma_max=float(sigmas[1])))
            rec = out[m]
            rec["max_abs_velocity_diff"] = max(rec["max_abs_velocity_diff"], float((v_m - v_all[:m]).abs().max()))
            rec["max_abs_ratio_minus_1"] = max(rec["max_abs_ratio_minus_1"],
                                               float((torch.exp(recomputed - sampled[:m]) - 1).abs().max()))
        x = x_next
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 3, 8, 12], help="row counts m to evaluate alone")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--steps", type=int, default=3, help="SDE steps measured (the preset's branch window)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    cfg = make_config("shapes")
    if not all(0 < m < cfg.micro_batch for m in args.rows):
        ap.error(f"--rows must lie in [1, {cfg.micro_batch - 1}]: the batch they are compared with has {cfg.micro_batch}")
    policy = FlowPolicy.from_pretrained(cfg.model, micro_batch=cfg.micro_batch)
    results = {}
    for name in args.precisions:
        with torch.no_grad(), policy.precision(PRECISIONS[name]):
            results[name] = measure(policy, cfg, args.rows, args.steps, args.seed)
    print(f"| precision | rows alone (of {cfg.micro_batch}) | max abs velocity difference | max abs (ratio - 1) |")
    print("|---|---|---|---|")
    for name, per_m in results.items():
        for m, rec in per_m.items():
            print(f"| {name} | {m} | {rec['max_abs_velocity_diff']:.3g} | {rec['max_abs_ratio_minus_1']:.3g} |")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "steps": args.steps, "seed": args.seed, "results": results}, indent=1))


if __name__ == "__main__":
    main()
