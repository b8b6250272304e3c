"""`flowgrpo eval geneval`: GenEval-format metadata scored with the exact Shapes verifier."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_geneval_command(args: argparse.Namespace) -> int:
    from flowgrpo.eval.geneval import check_shapes_metadata, evaluate, markdown_table, write_report
    from flowgrpo.prompts.loaders import PromptFileError, load_geneval, load_prompts
    from flowgrpo.sample import load_policy_for_sampling

    try:
        entries = load_prompts(args.metadata) if args.metadata.startswith("shapes:") else load_geneval(args.metadata)
        check_shapes_metadata(entries)
    except (PromptFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from flowgrpo.assets import SHAPES_MODEL

    policy = load_policy_for_sampling(args.model or str(SHAPES_MODEL), lora=args.lora, batch=args.batch)
    result = evaluate(policy, entries, images_per_prompt=args.n, num_steps=args.steps, guidance=args.guidance,
                      seed=args.seed, batch=args.batch)
    out = write_report(result, args.out, name=Path(args.model or "shapes-base").name)
    (out / "command.json").write_text(json.dumps(vars(args) | {"func": None}, indent=1, default=str))
    print(markdown_table({Path(args.model or "shapes-base").name: result.summary()}))
    print(f"report: {out / 'report.md'}  grid: {out / 'grid.png'}")
    return 0


def register_geneval(eval_subparsers: argparse._SubParsersAction) -> None:
    p = eval_subparsers.add_parser(
        "geneval", help="GenEval-style accuracy per tag on Shapes metadata (exact verifier)",
        description="Generate N images per metadata entry and score them with the exact Shapes verifier: per-tag "
                    "accuracy with standard errors, overall = mean over tags, malformed/empty rates and background "
                    "noise as image-quality guards. Writes results.json, report.md and grid.png (green = pass).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local diffusers pipeline directory (default: the shipped Shapes model)")
    p.add_argument("--lora", default=None, help="LoRA weights directory to load on top of --model")
    p.add_argument("--metadata", default="shapes:test", help="GenEval-format JSONL, or shapes:test / shapes:train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=2, help="images per entry")
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.set_defaults(func=run_geneval_command)
