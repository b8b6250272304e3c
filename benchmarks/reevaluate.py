"""Evaluate several Shapes models under one protocol (same prompts, images per entry, evaluation seed), so that
trained models from different runs compare with each other and with the base model on fresh evaluation noise.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/reevaluate.py base=flowgrpo/assets/shapes-base \
        seed0=runs/shapes-grpo/final seed1=runs/shapes-grpo-seed1/final --n 4 --seed 1234 \
        --out benchmarks/results/reeval.md

Each NAME=DIR is a diffusers pipeline directory (a run's `final/` export). Writes markdown tables (overall and
per-tag accuracy with standard errors, quality guards; which requirements failed) and the same figures as JSON
beside them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowgrpo.eval.geneval import evaluate, markdown_table, report_markdown
from flowgrpo.policies.generator import load_policy_for_sampling
from flowgrpo.prompts.loaders import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="NAME=DIR")
    ap.add_argument("--metadata", default="shapes:test")
    ap.add_argument("--tags", nargs="*", default=None, help="evaluate only the entries of these tags")
    ap.add_argument("--n", type=int, default=4, help="images per entry")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=1234, help="evaluation seed (a run's own evaluations use its --seed)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True, help="markdown table; the JSON goes beside it")
    args = ap.parse_args()
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        ap.error("models must be given as NAME=DIR")
    entries = [e for e in load_prompts(args.metadata) if args.tags is None or e.get("tag") in args.tags]
    if not entries:
        ap.error(f"no entries of tags {args.tags} in {args.metadata}")
    results = {}
    for name, path in pairs:
        policy = load_policy_for_sampling(path, lora=None, batch=args.batch)
        results[name] = evaluate(policy, entries, images_per_prompt=args.n, num_steps=args.steps,
                                 guidance=args.guidance, seed=args.seed, batch=args.batch).summary()
        print(markdown_table({name: results[name]}).splitlines()[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report_markdown(results))
    protocol = {k: v for k, v in vars(args).items() if k not in ("models", "out")}
    args.out.with_suffix(".json").write_text(json.dumps({"protocol": protocol, "models": dict(pairs),
                                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
