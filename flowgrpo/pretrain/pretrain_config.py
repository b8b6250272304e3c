"""Options of `flowgrpo pretrain-shapes` (kept free of heavy imports: the CLI builds its parser from them)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

KINDS = ("flow", "mdm")
# Options whose default depends on the kind of model pretrained (None in PretrainConfig = this default).
KIND_DEFAULTS = {
    "flow": dict(steps=12000, lr=5e-4, patch_size=4, num_layers=4, head_dim=32, heads=4, eval_every=1000,
                 eval_steps=20, eval_cfg=3.0),
    "mdm": dict(steps=4500, lr=1e-3, patch_size=0, num_layers=4, head_dim=16, heads=4, eval_every=500,
                eval_steps=24, eval_cfg=3.0, eval_temperature=0.5, eval_remask=2.0),
}

MDM_ONLY = ("eval_temperature", "eval_remask")  # sampling options of the masked diffusion model's schedule


@dataclass(frozen=True)
class PretrainConfig:
    kind: str = "flow"
    out: str = "runs/shapes-pretrain"
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None
    warmup: int = 200
    min_lr_ratio: float = 0.1
    ema: float = 0.999
    cond_dropout: float = 0.1
    seed: int = 0
    patch_size: int | None = None
    num_layers: int | None = None
    head_dim: int | None = None
    heads: int | None = None
    eval_every: int | None = None
    eval_per_tag: int = 16
    eval_steps: int | None = None
    eval_cfg: float | None = None
    eval_temperature: float | None = None
    eval_remask: float | None = None
    threads: int = 2
    init: str = ""
    max_minutes: float = 0.0
    resume: bool = False

    def resolved(self) -> "PretrainConfig":
        """The options with the kind's defaults filled in (what a run records and a resumption compares)."""
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "mdm" and self.patch_size:
            raise ValueError("--patch-size applies to the flow model; the masked diffusion model's tokens are pixels")
        for name in MDM_ONLY:
            if self.kind != "mdm" and getattr(self, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} applies to the masked diffusion model (--kind mdm)")
        return replace(self, **{k: v for k, v in KIND_DEFAULTS[self.kind].items() if getattr(self, k) is None})


HELP = {
    "kind": "flow = the SD3-style flow-matching model (flowgrpo/assets/shapes-base); mdm = the aMUSEd-style masked "
            "diffusion model (flowgrpo/assets/shapes-mdm)",
    "out": "run directory: stepNNNNNN/ pipelines (EMA weights), log.jsonl, and state.pt for --resume",
    "steps": "optimizer steps of the whole run (the learning-rate schedule spans them)",
    "batch_size": "rendered images per step",
    "lr": "peak AdamW learning rate",
    "warmup": "linear warm-up steps",
    "min_lr_ratio": "the cosine schedule ends at this fraction of --lr",
    "ema": "EMA decay of the saved weights",
    "cond_dropout": "fraction of prompts replaced by the empty prompt (for classifier-free guidance)",
    "seed": "seed of the data, noise, initial weights and the frozen text encoders",
    "patch_size": "flow transformer patch size in pixels",
    "num_layers": "transformer blocks",
    "head_dim": "attention head width",
    "heads": "attention heads (width = heads x head dim)",
    "eval_every": "steps between checkpoints, each with a conditioning probe and a mini-evaluation",
    "eval_per_tag": "test entries per tag in the mini-evaluation (one image each)",
    "eval_steps": "sampling steps of the mini-evaluation (mdm: also the length of the saved default schedule)",
    "eval_cfg": "guidance scale of the mini-evaluation (mdm: also the saved default schedule's)",
    "eval_temperature": "sampling temperature of the mini-evaluation and the saved default schedule",
    "eval_remask": "remasking (choice) temperature at the first unmasking step of the mini-evaluation and the saved "
                   "default schedule; it falls linearly to 0 at the last",
    "threads": "torch CPU threads",
    "init": "a Shapes pipeline directory (e.g. flowgrpo/assets/shapes-base) whose transformer starts the weights and "
            "the EMA: continued pretraining; the transformer options must match it",
    "max_minutes": "stop cleanly after this many minutes of this invocation (0 = no limit); --resume continues",
    "resume": "continue the run saved in --out exactly where it stopped (same options except --threads and "
              "--max-minutes)",
}
TYPES = {"steps": int, "lr": float, "patch_size": int, "num_layers": int, "head_dim": int, "heads": int,
         "eval_every": int, "eval_steps": int, "eval_cfg": float, "eval_temperature": float, "eval_remask": float}
# Options that may change between a run and its resumption: they do not change what is trained.
RUN_CONTROL = ("threads", "max_minutes", "resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(PretrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
        elif f.name == "kind":
            parser.add_argument(flag, choices=KINDS, default=f.default, help=f"{HELP[f.name]} (default: flow)")
        elif f.default is None:
            per_kind = ", ".join(f"{k}: {KIND_DEFAULTS[k][f.name]!r}" for k in KINDS if f.name in KIND_DEFAULTS[k])
            parser.add_argument(flag, type=TYPES[f.name], default=None, help=f"{HELP[f.name]} (default: {per_kind})")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"{HELP[f.name]} (default: {f.default!r})")
