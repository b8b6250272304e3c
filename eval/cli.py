"""`flowgrpo eval BENCHMARK ...`: one parser per benchmark, each added by a hook in BENCHMARKS."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from flowgrpo.eval.judge import ChatJudge, JudgeConfigError
from flowgrpo.eval.unigenbench_data import UniGenBenchFormatError, load_prompts


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _gen_opt(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, null, lists
    except json.JSONDecodeError:
        return key, value


def register_unigenbench(eval_subparsers: argparse._SubParsersAction) -> None:
    """Add `flowgrpo eval unigenbench`."""
    p = eval_subparsers.add_parser(
        "unigenbench", help="UniGenBench: generate N images per prompt, judge each testpoint, report",
        description="Run the UniGenBench protocol. Rerunning the same command resumes an interrupted run.",
    )
    p.add_argument("--prompts", default="shapes",
                   help="UniGenBench CSV (index,prompt_en|zh,sub_dims_en|zh) or 'shapes' for the Shapes test split")
    p.add_argument("--out", required=True, help="output folder (images/, progress.jsonl, results.csv, summary.json, report.md, grids/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local diffusers pipeline directory to generate with (default: the shipped Shapes "
                     "base model)")
    src.add_argument("--images", help="judge existing images DIR/{index}_{j}.png instead of generating")
    p.add_argument("--images-per-prompt", "--n", dest="images_per_prompt", type=_positive_int, default=4, help="images per prompt (default 4, as in UniGenBench)")
    p.add_argument("--limit", type=_positive_int, help="only the first K prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=4, help="prompts per generate() call")
    p.add_argument("--gen-opt", type=_gen_opt, action="append", default=[], metavar="KEY=VALUE",
                   help="option passed to load_generator, e.g. steps=28 (repeatable; values parsed as JSON)")
    p.add_argument("--judge-backend", "--judge", dest="judge_backend", choices=["auto", "chat", "shapes"], default="auto",
                   help="chat = OpenAI-compatible endpoint; shapes = exact verifier; auto = chat if --judge-url else shapes")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="model name the endpoint serves")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the API key")
    p.add_argument("--judge-timeout", type=float, default=180.0, help="seconds per request")
    p.add_argument("--judge-attempts", type=_positive_int, default=4, help="tries per image before recording a failure")
    p.add_argument("--judge-backoff", type=float, default=2.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--judge-max-tokens", type=int, default=2048)
    p.add_argument("--judge-temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--concurrency", type=_positive_int, default=8, help="judge requests in flight")
    p.add_argument("--grid-size", type=_positive_int, default=16, help="images per dimension grid")
    p.set_defaults(func=run_unigenbench_command)


def _judge(args: argparse.Namespace):
    kind = args.judge_backend if args.judge_backend != "auto" else ("chat" if args.judge_url else "shapes")
    if kind == "shapes":
        from flowgrpo.eval.unigenbench_shapes import ShapesJudge

        return ShapesJudge()
    if not args.judge_url or not args.judge_model:
        raise ValueError("the chat judge needs --judge-url and --judge-model")
    key = None
    if args.judge_api_key_env:
        key = os.environ.get(args.judge_api_key_env)
        if not key:
            raise ValueError(f"--judge-api-key-env {args.judge_api_key_env}: that environment variable is not set")
    return ChatJudge(args.judge_url, args.judge_model, key, timeout=args.judge_timeout,
                     max_attempts=args.judge_attempts, backoff=args.judge_backoff,
                     max_tokens=args.judge_max_tokens, temperature=args.judge_temperature)


def _generator(args: argparse.Namespace):
    from flowgrpo.policies.generator import load_generator

    model = args.model
    if model is None:
        from flowgrpo.assets import SHAPES_MODEL

        model = str(SHAPES_MODEL)
    return load_generator(model, **dict(args.gen_opt))


def run_unigenbench_command(args: argparse.Namespace) -> int:
    """Entry point of `flowgrpo eval unigenbench`; returns the exit status."""
    from flowgrpo.eval.unigenbench import run_unigenbench

    try:
        if args.prompts == "shapes":
            from flowgrpo.eval.unigenbench_shapes import load_shapes_rows

            rows = load_shapes_rows("test")[: args.limit]
        else:
            rows = load_prompts(args.prompts, limit=args.limit)
        judge = _judge(args)
        generate = None if args.images else _generator(args)
        summary = run_unigenbench(rows, args.out, judge, generate=generate, images_dir=args.images, n=args.images_per_prompt,
                                  seed=args.seed, batch_size=args.batch_size, concurrency=args.concurrency,
                                  grid_size=args.grid_size)
    except (UniGenBenchFormatError, JudgeConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = summary["images"]
    overall = "n/a" if summary["overall"] is None else f"{summary['overall']:.2%}"
    print(f"UniGenBench overall {overall} over {len(summary['primary_dimensions'])} primary dimensions; "
          f"{images['judged']}/{images['expected']} images judged, {images['failed']} failed. "
          f"Report: {os.path.join(args.out, 'report.md')}")
    return 1 if images["failed"] else 0


# Hooks that each add one benchmark parser to `flowgrpo eval` (e.g. a geneval hook appended here).
def _register_geneval(eval_subparsers: argparse._SubParsersAction) -> None:
    from flowgrpo.eval.geneval_cli import register_geneval

    register_geneval(eval_subparsers)


BENCHMARKS: list[Callable[[argparse._SubParsersAction], None]] = [register_unigenbench, _register_geneval]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `flowgrpo eval` with one sub-command per entry of BENCHMARKS."""
    parser = subparsers.add_parser("eval", help="benchmarks (UniGenBench, ...)")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
    eval_subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for hook in BENCHMARKS:
        hook(eval_subparsers)
