"""Subcommands `train`, `sample` and `pretrain-shapes` of the `flowgrpo` CLI."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from flowgrpo.checkpoint import CheckpointError
    from flowgrpo.config import ConfigError, make_config, overrides_from_args
    from flowgrpo.distributed import LaunchError
    from flowgrpo.prompts.loaders import PromptFileError
    from flowgrpo.train import train
    from flowgrpo.trainer import UnscorableError

    try:
        with warnings.catch_warnings(record=True) as caught:  # old option names: one line each, not a source dump
            warnings.simplefilter("always", FutureWarning)
            try:
                cfg = make_config(args.preset, args.config, overrides_from_args(args))
            finally:
                for w in caught:
                    print(f"flowgrpo train: warning: {w.message}", file=sys.stderr)
        train(cfg)
    except (ConfigError, PromptFileError, LaunchError, CheckpointError, UnscorableError) as err:
        print(f"flowgrpo train: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, UnscorableError) else 2  # 2 = bad input or configuration
    return 0


def _sample(args: argparse.Namespace) -> int:
    from flowgrpo.assets import SHAPES_MODEL
    from flowgrpo.policies.generator import load_generator

    try:
        generate = load_generator(args.model or str(SHAPES_MODEL), lora=args.lora, steps=args.num_steps,
                                  guidance=args.guidance, batch=args.micro_batch)
    except (OSError, ValueError) as err:  # a missing or unreadable model directory, a LoRA it cannot take
        print(f"flowgrpo sample: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = generate([args.prompt], args.images_per_prompt, args.seed)[0]
    for i, img in enumerate(images):
        img.save(out / f"{i:03d}.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from flowgrpo.pretrain.pretrain import pretrain
    from flowgrpo.pretrain.pretrain_config import PretrainConfig

    pretrain(PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from flowgrpo.config import PRESETS, add_arguments
    from flowgrpo.pretrain.pretrain_config import add_arguments as add_pretrain_arguments

    p = sub.add_parser("train", help="GRPO-train a flow-matching text-to-image model",
                       description="Train with Flow-GRPO. The preset applies first, then the YAML file, then the options given here. "
                                   "The `shapes` preset trains the shipped Shapes base model on this CPU in ~15 min "
                                   "and prints base vs trained accuracy.")
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS), help="typed preset to start from")
    p.add_argument("--config", default=None, help="YAML file of option: value overrides")
    add_arguments(p)
    p.set_defaults(func=_train)

    s = sub.add_parser("sample", help="write images for a prompt from a local pipeline (flow: ODE sampling; masked "
                                      "diffusion: its schedule)")
    s.add_argument("--model", default=None, help="local diffusers pipeline directory (default: the Shapes base model; "
                   "an AmusedPipeline directory, e.g. flowgrpo/assets/shapes-mdm, is a masked diffusion model)")
    s.add_argument("--lora", default=None, help="optional LoRA weights directory saved by `flowgrpo train`")
    s.add_argument("--prompt", required=True)
    s.add_argument("--out", required=True, help="output directory for NNN.png")
    s.add_argument("--images-per-prompt", "--n", dest="images_per_prompt", type=int, default=4, help="number of images")
    s.add_argument("--num-steps", "--steps", dest="num_steps", type=int, default=None, help="Euler steps (default 20); a masked diffusion model: "
                   "unmasking steps of the hand-set schedule instead of its own")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4.5); a "
                   "masked diffusion model: the hand-set schedule's CFG instead of its own schedule")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--micro-batch", "--batch", dest="micro_batch", type=int, default=16, help="images per forward pass")
    s.set_defaults(func=_sample)

    r = sub.add_parser("pretrain-shapes", help="pretrain the Shapes base model (about an hour on 2 CPU cores)",
                       description="Flow-matching pretraining of the Shapes base model on rendered images (frozen text "
                                   "encoders and VAE). Checkpoints every --eval-every steps; stop with --max-minutes "
                                   "and continue with --resume.")
    add_pretrain_arguments(r)
    r.set_defaults(func=_pretrain)
