"""`flowgrpo eval geneval`: GenEval-format metadata scored with the exact Shapes verifier, or for real GenEval
classes with a COCO detector and CLIP (`--scorer detector`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_geneval_command(args: argparse.Namespace) -> int:
    from flowgrpo.eval.geneval import evaluate, markdown_table, score_images, write_report
    from flowgrpo.eval.geneval_images import load_geneval_images
    from flowgrpo.prompts.loaders import PromptFileError, load_geneval, load_prompts
    from flowgrpo.policies.generator import load_policy_for_sampling, sampling_settings
    from flowgrpo.shapes.verify import verify

    try:
        if args.images:
            images, entries = load_geneval_images(args.images)
        else:
            entries = load_prompts(args.prompts) if args.prompts.startswith("shapes:") else load_geneval(args.prompts)
        scorer = _scorer(args, entries)
    except (PromptFileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.images:
        name = Path(args.images).name
        result = score_images(images, entries, scorer or verify)
    else:
        from flowgrpo.assets import SHAPES_MODEL

        name = Path(args.model or "shapes-base").name
        policy = load_policy_for_sampling(args.model or str(SHAPES_MODEL), lora=args.lora, batch=args.micro_batch)
        steps, guidance = sampling_settings(policy, args.num_steps, args.guidance)
        result = evaluate(policy, entries, images_per_prompt=args.images_per_prompt, num_steps=steps, guidance=guidance,
                          seed=args.seed, batch=args.micro_batch, scorer=scorer)
    out = write_report(result, args.out, name=name)
    (out / "command.json").write_text(json.dumps(vars(args) | {"func": None}, indent=1, default=str))
    print(markdown_table({name: result.summary()}))
    print(f"report: {out / 'report.md'}  grid: {out / 'grid.png'}")
    return 0


def _scorer(args: argparse.Namespace, entries: list[dict]):
    """None for the Shapes verifier (once the entries are known to be Shapes metadata), else a GenevalScorer."""
    if args.scorer == "shapes":
        from flowgrpo.eval.geneval import check_shapes_metadata

        try:
            check_shapes_metadata(entries)
        except ValueError as err:
            raise ValueError(f"{err} Score them with --scorer detector --detector PATH --clip PATH.") from None
        return None
    missing = [flag for flag, path in (("--detector", args.detector), ("--clip", args.clip)) if not path]
    if missing:
        raise ValueError(f"--scorer detector needs {' and '.join(missing)}: the local directories of a Mask2Former "
                         "COCO instance-segmentation model and of a transformers CLIP (ViT-L/14 for GenEval)")
    import torch

    from flowgrpo.rewards.geneval_detector import GenevalScorer
    from flowgrpo.rewards.geneval_rules import check_geneval_metadata

    check_geneval_metadata(entries)
    device = args.scorer_device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GenevalScorer(args.detector, args.clip, device=device, detector_size=args.detector_size,
                         detector_option="--detector", clip_option="--clip")


def register_geneval(eval_subparsers: argparse._SubParsersAction) -> None:
    p = eval_subparsers.add_parser(
        "geneval", help="GenEval accuracy per tag (Shapes verifier, or a COCO detector + CLIP for real GenEval)",
        description="Generate N images per metadata entry (or read them with --images) and score them: per-tag "
                    "accuracy with standard errors, "
                    "overall = mean over tags, why images fail, malformed/empty rates and background noise as "
                    "image-quality guards. Writes results.json, report.md and grid.png (green = pass). The default "
                    "scorer is the exact Shapes verifier (Shapes metadata only); GenEval's own metadata (80 COCO "
                    "classes) needs --scorer detector with local --detector and --clip directories, scored by "
                    "GenEval's rules (thresholds 0.3 / 0.9 for counting, CLIP colour on the masked object, "
                    "relative position with a 0.1 margin). Nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="local diffusers pipeline directory (default: the shipped Shapes "
                     "model; an AmusedPipeline directory is a masked diffusion model, sampled under its schedule)")
    src.add_argument("--images", metavar="DIR", help="score images already generated in GenEval's layout "
                     "(DIR/NNNNN/metadata.jsonl, DIR/NNNNN/samples/NNNN.png) instead of generating; --metadata, "
                     "--n and the generation options are then unused")
    p.add_argument("--lora", default=None, help="LoRA weights directory to load on top of --model")
    p.add_argument("--prompts", "--metadata", dest="prompts", default="shapes:test",
                   help="GenEval-format JSONL metadata, or shapes:test / shapes:train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--images-per-prompt", "--n", dest="images_per_prompt", type=int, default=2, help="images per entry")
    p.add_argument("--num-steps", "--steps", dest="num_steps", type=int, default=None, help="Euler steps (default 20); a masked diffusion model: "
                   "unmasking steps of the hand-set schedule instead of its own")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4.5); a "
                   "masked diffusion model: the hand-set schedule's CFG instead of its own schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch", "--batch", dest="micro_batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--scorer", choices=["shapes", "detector"], default="shapes",
                   help="shapes = the exact Shapes verifier; detector = GenEval's protocol with --detector and --clip")
    p.add_argument("--detector", metavar="PATH", help="local Mask2Former COCO instance-segmentation model directory "
                   "(e.g. a download of facebook/mask2former-swin-small-coco-instance)")
    p.add_argument("--clip", metavar="PATH", help="local transformers CLIP directory with its processor and tokenizer "
                   "(e.g. a download of openai/clip-vit-large-patch14, GenEval's colour classifier)")
    p.add_argument("--detector-size", type=int, default=800,
                   help="short side the detector sees (800 = mmdetection's test scale, as in GenEval)")
    p.add_argument("--scorer-device", default=None, help="device of the detector and CLIP; None = cuda if available")
    p.set_defaults(func=run_geneval_command)
