"""Options of `flowgrpo pretrain-shapes` (kept free of heavy imports: the CLI builds its parser from them)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainConfig:
    out: str = "runs/shapes-pretrain"
    steps: int = 12000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    min_lr_ratio: float = 0.1
    ema: float = 0.999
    cond_dropout: float = 0.1
    seed: int = 0
    patch_size: int = 4
    num_layers: int = 4
    head_dim: int = 32
    heads: int = 4
    eval_every: int = 1000
    eval_per_tag: int = 16
    eval_steps: int = 20
    eval_cfg: float = 3.0
    threads: int = 2
    init: str = ""
    max_minutes: float = 0.0
    resume: bool = False


HELP = {
    "out": "run directory: stepNNNNNN/ pipelines (EMA weights), log.jsonl, and state.pt for --resume",
    "steps": "optimizer steps of the whole run (the learning-rate schedule spans them)",
    "batch_size": "rendered images per step",
    "lr": "peak AdamW learning rate",
    "warmup": "linear warm-up steps",
    "min_lr_ratio": "the cosine schedule ends at this fraction of --lr",
    "ema": "EMA decay of the saved weights",
    "cond_dropout": "fraction of prompts replaced by the empty prompt (for classifier-free guidance)",
    "seed": "seed of the data, noise, initial weights and the frozen text encoders",
    "patch_size": "transformer patch size in pixels",
    "num_layers": "transformer blocks",
    "head_dim": "attention head width",
    "heads": "attention heads (width = heads x head dim)",
    "eval_every": "steps between checkpoints, each with a conditioning probe and a mini-evaluation",
    "eval_per_tag": "test entries per tag in the mini-evaluation (one image each)",
    "eval_steps": "Euler steps of the mini-evaluation",
    "eval_cfg": "guidance scale of the mini-evaluation",
    "threads": "torch CPU threads",
    "init": "a Shapes pipeline directory (e.g. flowgrpo/assets/shapes-base) whose transformer starts the weights and "
            "the EMA: continued pretraining; the transformer options must match it",
    "max_minutes": "stop cleanly after this many minutes of this invocation (0 = no limit); --resume continues",
    "resume": "continue the run saved in --out exactly where it stopped (same options except --threads and "
              "--max-minutes)",
}
# Options that may change between a run and its resumption: they do not change what is trained.
RUN_CONTROL = ("threads", "max_minutes", "resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in PretrainConfig.__dataclass_fields__.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[name])
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default,
                                help=f"{HELP[name]} (default: {field.default!r})")
