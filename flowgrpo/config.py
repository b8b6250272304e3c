"""`flowgrpo train` configuration: one frozen dataclass, typed presets, YAML and CLI overrides.

The settings every trainer shares (batches, advantages, loss, optimizer, checkpoints) come from
`flowgrpo.settings.GRPOSettings`; this adds the model, the rollouts and the evaluation. Every derived size is
computed and checked in one place (`GRPOSettings.layout`), with errors that name the numbers that disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from flowgrpo.assets import SHAPES_MDM, SHAPES_MODEL
from flowgrpo.core import TRACKED_ESTIMATORS
from flowgrpo.policies.mdm import MODES, is_mdm
from flowgrpo.rewards import REWARDS
from flowgrpo.rewards.base import UnknownNameError, check_options
from flowgrpo.settings import ConfigError, GRPOSettings, opt
from flowgrpo.shapes.world import TAGS
from flowgrpo.strategies import STRATEGIES

__all__ = ["ConfigError", "PRESETS", "TrainConfig", "add_arguments", "check_tag_weights", "make_config",
           "overrides_from_args"]

SDE_KINDS = ("flow_grpo", "dance", "cps")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig(GRPOSettings):
    # model and data
    model: str = opt(str(SHAPES_MODEL), "local diffusers pipeline directory (SD3/SD3.5, FLUX or Sana; or an aMUSEd-style "
                                        "AmusedPipeline: a masked diffusion model, trained with Co-GRPO)")
    family_options: dict = opt(factory=dict, help="model-family options, e.g. {max_sequence_length: 128}")
    height: int = opt(0, "image height; 0 = the model's native size")
    width: int = opt(0, "image width; 0 = the model's native size")
    lora_rank: int = opt(0, "LoRA rank of the transformer's attention projections; 0 = full fine-tuning")
    trainable: str = opt("", "full fine-tuning of only the transformer parameters whose names match this regex "
                             "(e.g. 'context_embedder|text_embedder'); '' = all")
    precision: str = opt("fp32", "rollouts and updates: fp32, or bf16 autocast of the transformer (evaluation stays fp32)")
    prompts: str = opt("shapes:train", "training prompts: shapes:train, or a .jsonl (GenEval metadata) / .txt file")
    eval_prompts: str = opt("shapes:test", "evaluation prompts (GenEval metadata gives accuracy, else the mean reward)")
    tag_weights: dict = opt(factory=dict, help="tagged prompts: sampling weight of each tag (1 when unlisted), "
                                               "e.g. {counting: 2}; {} = every tag equally often")
    reward: str = opt("shapes", f"reward: {', '.join(REWARDS)} (remote = an HTTP service)")
    reward_options: dict = opt(factory=dict, help="reward options, e.g. {mode: strict}")
    judge: str = opt("", "Pref-GRPO: a pairwise judge (shapes, vlm_pairwise); '' = pointwise GRPO advantages")
    judge_options: dict = opt(factory=dict, help="pairwise judge options")
    pointwise_weight: float = opt(0.0, "Pref-GRPO: weight of the pointwise reward's advantages in the mix")
    # rollouts
    num_steps: int = opt(10, "sampling steps of rollouts (denoising reduction: fewer than eval_num_steps)")
    strategy: str = opt("g2rpo", "flow_grpo = SDE on every step of the window, all trained; dance_grpo = the same "
                                 "sampling, a random subset of train_steps trained; mixgrpo = MixGRPO, SDE only in a "
                                 "window of sde_steps that slides along the schedule as training goes; g2rpo = G²RPO "
                                 "singular stochastic sampling: each group shares its ODE path up to one branch step "
                                 "(random in the window) where each member takes one SDE step, then ODE; dense_grpo = "
                                 "DenseGRPO, a reward per step from ODE completions, advantages per step, a calibrated "
                                 "per-step noise scale")
    train_steps: int = opt(0, "dance_grpo: SDE steps trained per iteration (0 = 60%% of them, DanceGRPO's fraction); "
                              "masked diffusion models: steps whose model term trains per iteration (0 = all)")
    sde_steps: int = opt(3, "the SDE window: the first k steps (0 = all steps for flow_grpo, the first half for g2rpo)")
    window_shift_every: int = opt(25, "mixgrpo: iterations before the SDE window moves on (MixGRPO's shift interval)")
    window_stride: int = opt(1, "mixgrpo: steps the window moves each time")
    window_end: int = opt(0, "mixgrpo: the window moves within the first n steps, then starts again at step 0 "
                             "(0 = 60%% of num_steps, MixGRPO's timestep fraction)")
    ode_solver: str = opt("euler", "mixgrpo: the ODE steps after the window: euler, or dpm2 = DPM-Solver++(2M) "
                                   "(MixGRPO-Flash)")
    ode_compress: float = opt(1.0, "mixgrpo: integrate the steps after the window on this fraction of them "
                                   "(MixGRPO-Flash: 0.4); 1 = all")
    calibrate_iterations: int = opt(20, "dense_grpo: iterations during which the per-step noise scale is calibrated "
                                        "from the signs of the dense rewards; frozen after")
    calibrate_balance: float = opt(2.0, "dense_grpo: a step's dense rewards count as balanced when "
                                        "|#positive - #negative| < this (over the whole batch)")
    calibrate_step: float = opt(0.01, "dense_grpo: how far one calibration round moves a step's noise scale")
    granularities: int = opt(1, "G²RPO multi-granularity: also finish each branch by ODE on every 2nd, ..., n-th "
                                "later sigma and sum the n advantages (each normalised in its groups)")
    schedule_jitter: int = opt(0, "m > 0: each iteration's rollouts step through the model's m x finer grid at a random "
                                  "offset (same step count), so training visits every noise level, not one grid's")
    guidance: float = opt(4.5, "classifier-free guidance scale of rollouts, training and evaluation")
    noise_level: float = opt(1.2, "SDE noise level (Flow-GRPO's a, DanceGRPO's eta, CPS's level in [0, 1])")
    sde_kind: str = opt("flow_grpo", "SDE step: flow_grpo, dance (constant sigma_t) or cps (coefficients-preserving)")
    shared_noise: bool = opt(True, "the members of a group start from the same initial noise")
    antithetic: bool = opt(False, "members 2j and 2j+1 of a group take opposite SDE noise (variance reduction)")
    noise_freqs: int = opt(0, "k > 0: SDE noise only in the k x k lowest DCT frequencies of each latent channel "
                              "(the layout), deterministic elsewhere; 0 = white noise")
    ema_decay: float = opt(0.0, "evaluate and export a moving average of the weights (per iteration); 0 = live weights")
    # masked diffusion models (an AmusedPipeline directory as --model): Co-GRPO
    co_mode: str = opt("joint", "masked diffusion models (Co-GRPO): what trains - model (the MDM), schedule (its "
                                "inference schedule: unmask ratio, temperatures, CFG per step) or joint (both, on one "
                                "advantage per trajectory)")
    schedule_lr: float = opt(1e-2, "masked diffusion models: learning rate of the schedule policy (the learning-rate "
                                   "schedule decays it with lr)")
    schedule_std: float = opt(0.0, "masked diffusion models: the schedule policy's exploration std before squashing "
                                   "(0 = the model's own)")
    # budget and evaluation
    iterations: int = opt(300, "iterations (rollout + update): the training budget")
    max_minutes: float = opt(0.0, "> 0: also stop after this much training time (evaluation excluded); 0 = no limit")
    eval_every: int = opt(80, "evaluate (and write an image grid) every n iterations")
    eval_num_steps: int = opt(20, "Euler steps of evaluation sampling")
    eval_images_per_prompt: int = opt(4, "images per evaluation prompt (300 Shapes test entries x 4: stderr ~1.2 points)")
    log_with: str = opt("tensorboard", "accelerate tracker (tensorboard, wandb, ...); '' = none")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_steps", "granularities", "iterations", "eval_every", "eval_num_steps",
                     "eval_images_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("noise_level", "max_minutes", "schedule_jitter", "noise_freqs", "train_steps", "sde_steps",
                     "window_end", "calibrate_iterations", "calibrate_balance", "calibrate_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sde_kind not in SDE_KINDS:
            raise ConfigError(f"sde_kind {self.sde_kind!r} is not one of {SDE_KINDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {tuple(STRATEGIES)}")
        if self.strategy == "g2rpo" and not self.shared_noise:
            raise ConfigError("strategy g2rpo branches each group from one shared ODE path: it needs shared_noise=true")
        if is_mdm(self.model):
            self._check_mdm()
        elif self.train_steps and self.strategy != "dance_grpo":
            raise ConfigError(f"train_steps={self.train_steps} picks DanceGRPO's trained subset: it needs strategy "
                              f"dance_grpo (strategy {self.strategy} trains every SDE step it samples)")
        if self.sharding == "fsdp" and self.strategy == "g2rpo":
            raise ConfigError("sharding fsdp needs the same forward passes on every process; g2rpo evaluates each "
                              "process's groups in calls of their own (use ddp, or another strategy)")
        if self.granularities > 1 and self.strategy != "g2rpo":
            raise ConfigError(f"granularities={self.granularities} finishes G²RPO branches: it needs strategy g2rpo")
        if self.ode_solver not in ("euler", "dpm2"):
            raise ConfigError(f"ode_solver {self.ode_solver!r} is not one of ('euler', 'dpm2')")
        if not 0 < self.ode_compress <= 1:
            raise ConfigError(f"ode_compress must be in (0, 1], got {self.ode_compress}")
        if (self.ode_solver != "euler" or self.ode_compress < 1) and self.strategy != "mixgrpo":
            raise ConfigError(f"ode_solver={self.ode_solver!r} / ode_compress={self.ode_compress} integrate the steps "
                              f"after MixGRPO's window: they need strategy mixgrpo")
        for name in ("window_shift_every", "window_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window_end and not (self.sde_steps or 1) <= self.window_end <= self.num_steps:
            raise ConfigError(f"window_end={self.window_end} must hold the window (sde_steps={self.sde_steps}) and "
                              f"fit in num_steps={self.num_steps}")
        if self.strategy == "dense_grpo" and self.advantage in TRACKED_ESTIMATORS:
            raise ConfigError(f"advantage {self.advantage!r} keeps per-prompt statistics; dense_grpo normalises one "
                              "reward per step")
        if self.granularities > 1 and self.advantage in TRACKED_ESTIMATORS and not self.judge:
            raise ConfigError(f"advantage {self.advantage!r} keeps per-prompt statistics; it cannot be computed once "
                              f"per granularity (granularities={self.granularities})")
        if self.sde_steps > self.num_steps:
            raise ConfigError(f"sde_steps={self.sde_steps} must be in [0, num_steps={self.num_steps}]")
        if self.train_steps > self.num_steps:
            raise ConfigError(f"train_steps={self.train_steps} must be in [0, num_steps={self.num_steps}]")
        if self.trainable and self.lora_rank:
            raise ConfigError(f"trainable={self.trainable!r} selects parameters for full fine-tuning; "
                              f"with lora_rank={self.lora_rank} only the LoRA adapters train")
        if self.trainable:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise ConfigError(f"trainable={self.trainable!r} is not a regular expression: {e}") from e
        if self.antithetic and self.group_size % 2:
            raise ConfigError(f"antithetic noise pairs the members of a group: group_size={self.group_size} must be even")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.pointwise_weight <= 1:
            raise ConfigError(f"pointwise_weight must be in [0, 1], got {self.pointwise_weight}")
        if self.prompts.startswith("shapes:"):  # other prompt files are checked once loaded (`check_tag_weights`)
            check_tag_weights(self.tag_weights, TAGS)
        bad = {t: w for t, w in self.tag_weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0}
        if bad:
            raise ConfigError(f"tag_weights must be positive numbers, got {bad}")
        try:  # a misspelt option should stop the run before the model loads, not after
            check_options("reward", self.reward, self.reward_options)
            if self.judge:
                check_options("judge", self.judge, self.judge_options)
        except (UnknownNameError, TypeError) as e:
            raise ConfigError(str(e)) from e

    def _check_mdm(self) -> None:
        """A masked diffusion model trains in full fp32 on the model, its schedule or both."""
        if self.co_mode not in MODES:
            raise ConfigError(f"co_mode {self.co_mode!r} is not one of {MODES}")
        unsupported = {k: getattr(self, k) for k in ("lora_rank", "trainable") if getattr(self, k)}
        if self.precision != "fp32":
            unsupported["precision"] = self.precision
        if self.sharding != "ddp":
            unsupported["sharding"] = self.sharding
        if unsupported:
            raise ConfigError(f"{unsupported} are not supported for masked diffusion models ({self.model}): they train "
                              "the whole transformer in fp32")
        if self.schedule_lr <= 0 or self.schedule_std < 0:
            raise ConfigError(f"schedule_lr must be > 0 and schedule_std >= 0, got {self.schedule_lr}, "
                              f"{self.schedule_std}")


def check_tag_weights(weights: dict, tags) -> None:
    """Every tag given a sampling weight must be one of the prompt set's tags."""
    unknown = sorted(set(weights) - set(tags))
    if unknown:
        raise ConfigError(f"tag_weights: unknown tag(s) {unknown}; tags are {', '.join(tags) or '(none)'}")


PRESETS: dict[str, dict] = {
    # The embedded default: the shipped Shapes base model, 300 iterations (a budget in work, so the result does not
    # depend on the machine's speed; ~12 minutes of training on 2 CPU cores), with Pref-GRPO win-rate advantages from
    # the verifier as a pairwise judge (on a par with pointwise advantages in BENCHMARKS.md).
    "shapes": dict(judge="shapes"),
    # The shipped Shapes masked diffusion model with Co-GRPO (model and schedule jointly; --co-mode model|schedule).
    # Learning rates: one update at 1e-4 / 0.1 lowered the log-prob of every sampled trajectory, those with positive
    # advantages too (an overshoot: training reward fell); at 1e-5 / 1e-2 it moves each along its advantage.
    "shapes-mdm": dict(model=str(SHAPES_MDM), num_steps=24, prompts_per_iter=8, group_size=6, micro_batch=24,
                       train_steps=4, lr=1e-5, schedule_lr=1e-2, beta=0.0, iterations=100, eval_every=50,
                       out="runs/shapes-mdm"),
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
                            help=f"{f.metadata['help']} (shapes preset: {PRESETS['shapes'].get(f.name, default)!r})")


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
