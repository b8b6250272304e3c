"""`flowgrpo train` configuration: one frozen dataclass, typed presets, YAML and CLI overrides.

Every derived size (samples per iteration, micro-batches, optimizer steps) is computed and checked
in `TrainConfig.__post_init__`, with errors that name the numbers that disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.core import TRACKED_ESTIMATORS

SDE_KINDS = ("flow_grpo", "dance", "cps")
STRATEGIES = ("flow_grpo", "g2rpo")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent with another."""


@dataclass(frozen=True)
class TrainConfig:
    # model and data
    model: str = str(SHAPES_MODEL)
    family_options: dict = field(default_factory=dict)
    height: int = 0  # 0 = the model's native size
    width: int = 0
    lora_rank: int = 0  # 0 = full fine-tuning
    precision: str = "fp32"  # rollouts and updates: fp32, or bf16 autocast of the transformer (evaluation stays fp32)
    prompts: str = "shapes:train"
    eval_prompts: str = "shapes:test"
    reward: str = "shapes"
    reward_options: dict = field(default_factory=dict)
    judge: str = ""  # Pref-GRPO: a pairwise judge name (e.g. shapes, vlm_pairwise); "" = pointwise GRPO
    judge_options: dict = field(default_factory=dict)
    pointwise_weight: float = 0.0  # Pref-GRPO: weight of the pointwise reward's advantages in the mix
    out: str = "runs/shapes-grpo"
    seed: int = 0
    # rollouts
    prompts_per_iter: int = 12  # per process
    group_size: int = 8
    micro_batch: int = 24
    num_steps: int = 10  # SDE sampling steps (denoising reduction: fewer than eval_num_steps)
    train_steps: int = 0  # 0 = train on every SDE step; k > 0 = a random subset of k (DanceGRPO)
    # flow_grpo = SDE on every step of the window; g2rpo = G²RPO singular stochastic sampling: each group shares its
    # ODE path up to one branch step (random in the window) where each member takes one SDE step, then ODE
    strategy: str = "g2rpo"
    sde_steps: int = 3  # the SDE window: the first k steps (0 = all steps for flow_grpo, the first half for g2rpo)
    # g2rpo multi-granularity: also finish each branch by ODE on every 2nd, ..., n-th later sigma and sum the
    # advantages of all n granularities (each normalised in its groups); 1 = the sampling schedule only
    granularities: int = 1
    guidance: float = 4.5
    noise_level: float = 1.2
    sde_kind: str = "flow_grpo"
    shared_noise: bool = True
    antithetic: bool = False  # members 2j and 2j+1 of a group take opposite SDE noise (variance reduction)
    noise_freqs: int = 0  # k > 0: SDE noise only in the k x k lowest DCT frequencies of the latent (layout); 0 = white
    # GRPO update
    advantage: str = "grpo"
    advantage_options: dict = field(default_factory=dict)
    adv_clip: float = 5.0
    zero_std: str = "keep"
    loss_agg: str = "token-mean"
    clip_low: float = 1e-3
    clip_high: float = 1e-3
    beta: float = 0.02  # KL to the reference (keeps images clean); 0 never runs the reference
    lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer_steps: int = 1  # optimizer steps per iteration (the batch is split between them)
    inner_epochs: int = 1
    ema_decay: float = 0.0  # evaluate and export a moving average of the weights (per iteration); 0 = the live weights
    # schedule and evaluation
    iterations: int = 1000
    max_minutes: float = 15.0  # > 0: stop after this much training time (evaluation excluded); 0 = no limit
    eval_every: int = 80
    eval_num_steps: int = 20
    eval_images_per_prompt: int = 4  # 300 test entries x 4: standard error ~1.2 points
    save_every: int = 50
    resume: bool = True
    log_with: str = "tensorboard"

    def __post_init__(self) -> None:
        positive = ("prompts_per_iter", "group_size", "micro_batch", "num_steps", "granularities", "optimizer_steps",
                    "inner_epochs",
                    "iterations", "eval_every", "eval_num_steps", "eval_images_per_prompt", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sde_kind not in SDE_KINDS:
            raise ConfigError(f"sde_kind {self.sde_kind!r} is not one of {SDE_KINDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.strategy == "g2rpo" and not self.shared_noise:
            raise ConfigError("strategy g2rpo branches each group from one shared ODE path: it needs shared_noise=true")
        if self.strategy == "g2rpo" and self.train_steps > 1:
            raise ConfigError(f"strategy g2rpo has one SDE step per sample; train_steps={self.train_steps} must be 0 or 1")
        if self.granularities > 1 and self.strategy != "g2rpo":
            raise ConfigError(f"granularities={self.granularities} finishes G²RPO branches: it needs strategy g2rpo")
        if self.granularities > 1 and self.advantage in TRACKED_ESTIMATORS and not self.judge:
            raise ConfigError(f"advantage {self.advantage!r} keeps per-prompt statistics; it cannot be computed once "
                              f"per granularity (granularities={self.granularities})")
        if not 0 <= self.sde_steps <= self.num_steps:
            raise ConfigError(f"sde_steps={self.sde_steps} must be in [0, num_steps={self.num_steps}]")
        if not 0 <= self.train_steps <= self.num_steps:
            raise ConfigError(f"train_steps={self.train_steps} must be in [0, num_steps={self.num_steps}]")
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: GRPO needs at least 2 samples per prompt")
        if self.noise_freqs < 0:
            raise ConfigError(f"noise_freqs must be >= 0 (0 = white noise), got {self.noise_freqs}")
        if self.antithetic and self.group_size % 2:
            raise ConfigError(f"antithetic noise pairs the members of a group: group_size={self.group_size} must be even")
        if self.batch_size % self.micro_batch:
            raise ConfigError(f"samples per iteration = prompts_per_iter x group_size = {self.prompts_per_iter} x "
                              f"{self.group_size} = {self.batch_size} is not a multiple of micro_batch={self.micro_batch}")
        if (self.batch_size // self.micro_batch) % self.optimizer_steps:
            raise ConfigError(f"{self.batch_size // self.micro_batch} micro-batches per iteration cannot be split evenly "
                              f"into optimizer_steps={self.optimizer_steps}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.pointwise_weight <= 1:
            raise ConfigError(f"pointwise_weight must be in [0, 1], got {self.pointwise_weight}")
        for name in ("clip_low", "clip_high", "beta", "lr", "noise_level", "adv_clip", "max_minutes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def batch_size(self) -> int:
        """Samples per iteration on one process."""
        return self.prompts_per_iter * self.group_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.batch_size // self.micro_batch // self.optimizer_steps


PRESETS: dict[str, dict] = {
    # The embedded default: the shipped Shapes base model on a 2-core CPU in ~15 minutes, with Pref-GRPO win-rate
    # advantages from the verifier as a pairwise judge (on a par with pointwise advantages in BENCHMARKS.md).
    "shapes": dict(judge="shapes"),
    # Real models read from a local directory (pass --model PATH); values follow Flow-GRPO's GenEval recipes.
    "sd35-medium": dict(model="", strategy="flow_grpo", sde_steps=0, precision="bf16", height=512, width=512,
                        lora_rank=32, micro_batch=4, prompts_per_iter=4, group_size=8, num_steps=10, eval_num_steps=40,
                        guidance=4.5, noise_level=0.7, lr=3e-4, clip_low=1e-4, clip_high=1e-4, beta=0.004,
                        reward="shapes", prompts="prompts.jsonl", eval_prompts="prompts.jsonl", out="runs/sd35-grpo",
                        max_minutes=0.0, iterations=2000, family_options={"max_sequence_length": 128}),
    "flux-dev": dict(model="", strategy="flow_grpo", sde_steps=0, precision="bf16", height=512, width=512, lora_rank=32,
                     micro_batch=2, prompts_per_iter=4, group_size=8, num_steps=6, eval_num_steps=28, guidance=1.0,
                     noise_level=0.9, lr=1e-4, clip_low=1e-4, clip_high=1e-4, beta=0.0, out="runs/flux-grpo",
                     iterations=2000, max_minutes=0.0, family_options={"guidance_scale": 3.5}),
    "sana": dict(model="", strategy="flow_grpo", sde_steps=0, precision="bf16", height=512, width=512, lora_rank=32,
                 micro_batch=4, prompts_per_iter=4, group_size=8, num_steps=10, eval_num_steps=20, guidance=4.5,
                 noise_level=0.7, lr=1e-4, clip_low=1e-4, clip_high=1e-4, beta=0.0, out="runs/sana-grpo",
                 iterations=2000, max_minutes=0.0),
}


def _coerce(name: str, value, default):
    if isinstance(default, bool) and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}: expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, dict) and isinstance(value, str):
        value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    try:
        return type(default)(value) if not isinstance(default, dict) else dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read {value!r} as {type(default).__name__}") from e


def make_config(preset: str = "shapes", yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Preset, then a YAML file, then explicit overrides (later wins)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        values.update(loaded)
    values.update(overrides or {})
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; see `flowgrpo train --help`")
    cfg = TrainConfig(**{k: _coerce(k, v, defaults[k]) for k, v in values.items()})
    if not cfg.model:
        raise ConfigError(f"preset {preset!r} needs --model PATH: a local diffusers pipeline directory")
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field (default None = not given, so presets and YAML apply)."""
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = "bool" if isinstance(default, bool) else "mapping (YAML)" if isinstance(default, dict) else type(default).__name__
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=kind.upper(),
                            help=f"(default in the shapes preset: {PRESETS['shapes'].get(f.name, default)!r})")


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
