"""Where should a G²RPO branch step sit, and how noisy should it be? For each SDE kind / noise level and each
step k of the schedule, sample groups that share their initial noise and ODE path, branch every member with
one SDE step at k, finish by ODE, and verify the images. Reports per step:

- the quality of the branched samples (verifier score, strict pass rate, images with a malformed object), to
  compare with the plain ODE samples of the same noise: a branch that damages samples trains the policy on
  images the evaluation (ODE) never produces;
- the within-group spread (fraction of groups whose members differ in pass/fail, mean within-group variance
  of pass), the signal GRPO's group-normalised advantages need.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/branch_spread.py --settings flow_sde:1.2 flow_sde:0.7 \
        cps:0.8 --steps 0 1 2 3 4 5 6 --out benchmarks/results/branch_spread.md

A setting KIND:NOISE:K restricts the branch noise to the K x K lowest DCT frequencies (``--noise-freqs K``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from flowgrpo.config import make_config
from flowgrpo.media import to_uint8
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.samplers.rollout import group_noise
from flowgrpo.samplers.steps import SDE_STEPS
from flowgrpo.shapes.verify import verify
from flowgrpo.train import draw_prompts, load_policy


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def verdicts(policy, entries, group_ids, x_init, sigmas, mask, kind, noise_level, noise_freqs, seed, guidance):
    """[P, G] score, pass and malformed indicators of one batch of (branched or ODE) rollouts."""
    with torch.no_grad():
        ro = policy.rollout([e["prompt"] for e in entries], entries, group_ids, x_init, sigmas=sigmas, sde_mask=mask,
                            guidance=guidance, kind=kind, noise_level=noise_level, noise_freqs=noise_freqs,
                            generator=torch.Generator().manual_seed(seed))
    vs = [verify(img, meta) for img, meta in zip(to_uint8(ro.images), entries)]
    shape = (int(group_ids.max()) + 1, -1)
    return {"score": torch.tensor([v.score for v in vs]).view(shape),
            "pass": torch.tensor([float(v.passed) for v in vs]).view(shape),
            "malformed": torch.tensor([float(v.malformed > 0) for v in vs]).view(shape)}


def row(v: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"score": float(v["score"].mean()), "pass": float(v["pass"].mean()),
            "malformed": float(v["malformed"].mean()),
            "groups_with_pass_spread": float((v["pass"].std(1) > 0).float().mean()),
            "within_group_pass_var": float(v["pass"].var(1).mean())}


def fmt(name: str, k, sigma, r: dict[str, float]) -> str:
    return (f"| {name} | {k} | {sigma} | {r['score']:.3f} | {r['pass']:.3f} | {r['malformed']:.3f} | "
            f"{r['groups_with_pass_spread']:.2f} | {r['within_group_pass_var']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["flow_sde:1.2", "flow_sde:0.7"], metavar="KIND:NOISE[:FREQS]")
    ap.add_argument("--steps", nargs="+", type=int, default=list(range(7)), help="branch steps k to measure")
    ap.add_argument("--prompts", type=int, default=48, help="groups (tag-balanced training prompts)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="markdown table; the JSON goes beside it")
    args = ap.parse_args()
    settings = [s.split(":") for s in args.settings]
    settings = [s + ["0"] if len(s) == 2 else s for s in settings]  # no FREQS: white noise
    if any(len(s) != 3 or s[0] not in SDE_STEPS or not _is_float(s[1]) or not s[2].isdigit() for s in settings):
        ap.error(f"settings must be KIND:NOISE[:FREQS] with KIND in {sorted(SDE_STEPS)}, got {args.settings}")
    # the rollout runs in micro-batches, which must divide the batch
    micro_batch = math.gcd(args.prompts * args.group_size, make_config("shapes").micro_batch)
    cfg = make_config("shapes", overrides={"prompts_per_iter": args.prompts, "group_size": args.group_size,
                                           "micro_batch": micro_batch, "beta": 0.0})
    if any(not 0 <= k < cfg.num_steps for k in args.steps):
        ap.error(f"branch steps must lie in [0, {cfg.num_steps}) (the preset's schedule), got {args.steps}")
    policy = load_policy(cfg)
    entries = [e for e in draw_prompts(load_prompts(cfg.prompts), cfg, args.seed) for _ in range(args.group_size)]
    group_ids = torch.arange(args.prompts).repeat_interleave(args.group_size)
    sigmas = policy.sigmas(cfg.num_steps)
    x_init = group_noise(args.prompts, args.group_size, policy.latent_shape(),
                         generator=torch.Generator().manual_seed(args.seed))

    def run(mask, kind="flow_sde", level=0.0, freqs=0):
        return row(verdicts(policy, entries, group_ids, x_init, sigmas, mask, kind, level, freqs, args.seed + 1,
                            cfg.guidance))

    results = {"ode": run(torch.zeros(cfg.num_steps, dtype=torch.bool))}
    lines = ["| setting | branch step k | sigma_k | score | pass | malformed | groups with pass spread | "
             "within-group pass variance |", "|---|---|---|---|---|---|---|---|"]
    lines.append(fmt("ODE (no branch)", "–", "–", results["ode"]))
    for kind, level, freqs in settings:
        for k in args.steps:
            mask = torch.zeros(cfg.num_steps, dtype=torch.bool)
            mask[k] = True
            name = f"{kind} {level}" + (f" band {freqs}" if int(freqs) else "")
            r = results[f"{kind}:{level}:{freqs}@{k}"] = run(mask, kind, float(level), int(freqs))
            lines.append(fmt(name, k, f"{float(sigmas[k]):.3f}", r))
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    protocol = {k: v for k, v in vars(args).items() if k != "out"} | {"num_steps": cfg.num_steps,
                                                                       "guidance": cfg.guidance}
    args.out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "results": results}, indent=1))


if __name__ == "__main__":
    main()
