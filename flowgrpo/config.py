"""`flowgrpo train` configuration: one frozen dataclass, typed presets, YAML and CLI overrides.

The settings every trainer shares (batches, advantages, loss, optimizer, checkpoints) come from
`flowgrpo.settings.GRPOSettings`; this adds the model, the rollouts and the evaluation. Every derived size is
computed and checked in one place (`GRPOSettings.layout`), with errors that name the numbers that disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from flowgrpo.assets import SHAPES_MDM, SHAPES_MODEL
from flowgrpo.policies.mdm import is_mdm
from flowgrpo.rewards import REWARDS
from flowgrpo.rewards.base import UnknownNameError, check_options
from flowgrpo.settings import ConfigError, GRPOSettings, opt
from flowgrpo.shapes.world import TAGS
from flowgrpo.strategies import STRATEGIES, RunContext, Sampling

__all__ = ["ConfigError", "PRESETS", "TrainConfig", "add_arguments", "check_tag_weights", "make_config",
           "overrides_from_args"]

SDE_KINDS = ("flow_sde", "dance_sde", "cps")
OLD_SDE_KINDS = {"flow_grpo": "flow_sde", "dance": "dance_sde"}  # read, with a warning, for one more release
PRECISIONS = ("fp32", "bf16")
KL_CONVENTIONS = ("exact", "flow_grpo")
MODEL_KINDS = {"flow": "flow-matching", "mdm": "masked diffusion"}


@dataclass(frozen=True)
class TrainConfig(GRPOSettings):
    # model and data
    model: str = opt(str(SHAPES_MODEL), "local diffusers pipeline directory (SD3/SD3.5, FLUX or Sana; or an aMUSEd-style "
                                        "AmusedPipeline: a masked diffusion model, trained with Co-GRPO)")
    family_options: dict = opt(factory=dict, help="model-family options, e.g. {max_sequence_length: 128}")
    height: int = opt(0, "image height; 0 = the model's native size")
    width: int = opt(0, "image width; 0 = the model's native size")
    lora_rank: int = opt(0, "LoRA rank of the transformer's attention projections; 0 = full fine-tuning")
    lora_alpha: float = opt(0.0, "LoRA alpha (the adapters' scale is alpha / rank); 0 = the rank")
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
    # rollouts: the settings every strategy shares, then the strategy and its own options
    num_steps: int = opt(10, "sampling steps of rollouts (denoising reduction: fewer than eval_num_steps)")
    strategy: str = opt("", f"rollout strategy: {', '.join(STRATEGIES)} (each is described with its own options "
                            "--<strategy>.<option> below); '' = g2rpo for flow-matching models, co_grpo for masked "
                            "diffusion models")
    strategy_options: Any = opt(factory=dict, help="the strategy's own options (a mapping; on the command line "
                                                   "--<strategy>.<option>)")
    sde_steps: int = opt(3, "the SDE window: the first k steps (0 = all steps for flow_grpo, the first half for g2rpo)")
    schedule_jitter: int = opt(0, "m > 0: each iteration's rollouts step through the model's m x finer grid at a random "
                                  "offset (same step count), so training visits every noise level, not one grid's")
    guidance: float = opt(4.5, "classifier-free guidance scale of rollouts, training and evaluation")
    noise_level: float = opt(1.2, "SDE noise level (Flow-GRPO's a, DanceGRPO's eta, CPS's level in [0, 1])")
    sde_kind: str = opt("flow_sde", "SDE step: flow_sde (Flow-GRPO's, sigma_t = a sqrt(t / (1 - t))), dance_sde "
                                    "(DanceGRPO's constant sigma_t) or cps (coefficients-preserving)")
    shared_noise: bool = opt(True, "the members of a group start from the same initial noise")
    antithetic: bool = opt(False, "members 2j and 2j+1 of a group take opposite SDE noise (variance reduction)")
    noise_freqs: int = opt(0, "k > 0: SDE noise only in the k x k lowest DCT frequencies of each latent channel "
                              "(the layout), deterministic elsewhere; 0 = white noise")
    kl_convention: str = opt("exact", "the KL of an SDE step: exact = |mu - mu_ref|^2 / 2 std^2 with the step's std "
                                      "(sigma_t sqrt(dt)); flow_grpo = flow_grpo's |mu - mu_ref|^2 / 2 sigma_t^2, the "
                                      "exact one times dt, so a Flow-GRPO recipe's beta means what it meant there")
    grpo_guard: bool = opt(False, "GRPO-Guard: normalise each SDE step's PPO ratio (remove its negative bias and its "
                                  "1/std scale), against the over-optimisation coupled training shows (SDE strategies)")
    ema_decay: float = opt(0.0, "evaluate and export a moving average of the weights (per iteration); 0 = live weights")
    # budget and evaluation
    iterations: int = opt(300, "iterations (rollout + update): the training budget")
    max_minutes: float = opt(0.0, "> 0: also stop after this much training time (evaluation excluded); 0 = no limit")
    eval_every: int = opt(80, "evaluate (and write an image grid) every n iterations")
    eval_num_steps: int = opt(20, "Euler steps of evaluation sampling")
    eval_images_per_prompt: int = opt(4, "images per evaluation prompt (300 Shapes test entries x 4: stderr ~1.2 points)")
    eval_guidance: float = opt(0.0, "also evaluate the base and the trained model at this CFG scale beside --guidance "
                                    "(1 = CFG-free, as DiffusionNFT trains for), both in the report; 0 = only --guidance")
    log_with: str = opt("tensorboard", "accelerate tracker (tensorboard, wandb, ...); '' = none")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_steps", "iterations", "eval_every", "eval_num_steps", "eval_images_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("noise_level", "max_minutes", "schedule_jitter", "noise_freqs", "sde_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sde_kind in OLD_SDE_KINDS:
            warnings.warn(f"sde_kind {self.sde_kind!r} is now {OLD_SDE_KINDS[self.sde_kind]!r} (the strategies keep "
                          "their names); the old value is read for one more release", FutureWarning, stacklevel=3)
            object.__setattr__(self, "sde_kind", OLD_SDE_KINDS[self.sde_kind])
        if self.sde_kind not in SDE_KINDS:
            raise ConfigError(f"sde_kind {self.sde_kind!r} is not one of {SDE_KINDS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.kl_convention not in KL_CONVENTIONS:
            raise ConfigError(f"kl_convention {self.kl_convention!r} is not one of {KL_CONVENTIONS}")
        self._check_strategy()
        if is_mdm(self.model):
            self._check_mdm()
        if self.sde_steps > self.num_steps:
            raise ConfigError(f"sde_steps={self.sde_steps} must be in [0, num_steps={self.num_steps}]")
        if self.eval_guidance < 0:
            raise ConfigError(f"eval_guidance must be >= 0 (0 = none), got {self.eval_guidance}")
        if self.lora_alpha < 0 or (self.lora_alpha and not self.lora_rank):
            raise ConfigError(f"lora_alpha={self.lora_alpha} needs lora_rank > 0 and must be >= 0")
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

    @property
    def sampling(self) -> Sampling:
        """The sampling settings every strategy receives."""
        return Sampling(**{f.name: getattr(self, f.name) for f in fields(Sampling)})

    def _check_strategy(self) -> None:
        """The strategy (the model kind's default when unset), its own options as its dataclass, and its checks."""
        mdm = is_mdm(self.model)
        name = self.strategy or ("co_grpo" if mdm else "g2rpo")
        if name not in STRATEGIES:
            raise ConfigError(f"strategy {name!r} is not one of {tuple(STRATEGIES)}")
        cls, kind = STRATEGIES[name], "mdm" if mdm else "flow"
        if cls.kind != kind:
            fitting = ", ".join(n for n, c in STRATEGIES.items() if c.kind == kind)
            raise ConfigError(f"strategy {name} trains {MODEL_KINDS[cls.kind]} models; {self.model} is a "
                              f"{MODEL_KINDS[kind]} model (its strategies: {fitting})")
        options = self.strategy_options
        if not isinstance(options, cls.Options):
            given = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
            known = {f.name: f for f in fields(cls.Options)}
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ConfigError(f"unknown option(s) {unknown} of strategy {name}; its options are "
                                  f"{sorted(known) or 'none'}")
            options = cls.Options(**{k: _coerce(f"{name}.{k}", v, known[k].default) for k, v in given.items()})
        object.__setattr__(self, "strategy", name)
        object.__setattr__(self, "strategy_options", options)
        try:
            cls.check(options, self.sampling, RunContext(self.advantage, self.judge, self.sharding, self.kl_convention))
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def _check_mdm(self) -> None:
        """A masked diffusion model trains in full fp32 on the model, its schedule or both."""
        unsupported = {k: getattr(self, k) for k in ("lora_rank", "trainable") if getattr(self, k)}
        if self.precision != "fp32":
            unsupported["precision"] = self.precision
        if self.sharding != "ddp":
            unsupported["sharding"] = self.sharding
        if self.eval_guidance:  # it samples with its own schedule's guidance
            unsupported["eval_guidance"] = self.eval_guidance
        if unsupported:
            raise ConfigError(f"{unsupported} are not supported for masked diffusion models ({self.model}): they train "
                              "the whole transformer in fp32")


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
    "shapes-mdm": dict(model=str(SHAPES_MDM), strategy="co_grpo", num_steps=24, prompts_per_iter=8, group_size=6,
                       micro_batch=24, co_grpo=dict(model_steps=4, schedule_lr=1e-2), lr=1e-5, beta=0.0,
                       iterations=100, eval_every=50, out="runs/shapes-mdm"),
    # Real models read from a local directory (pass --model PATH and the task's --reward / --prompts).
    # Flow-GRPO's SD3.5-M GenEval recipe (yifan123/flow_grpo config/grpo.py geneval_sd3 over config/base.py, and
    # scripts/train_sd3.py). Where it departs: bf16 autocast for its fp16 mixed precision; its last step is sampled
    # with noise but not trained, here it is an ODE step (sde_steps 9).
    "sd35-medium": dict(
        model="", strategy="flow_grpo", precision="bf16", height=512, width=512,  # grpo.py: resolution 512
        lora_rank=32, lora_alpha=64,  # train_sd3.py: LoraConfig(r=32, lora_alpha=64, gaussian init)
        num_steps=10, eval_num_steps=40, guidance=4.5,  # grpo.py: sample.num_steps, eval_num_steps, guidance_scale
        sde_steps=9,  # grpo.py: train.timestep_fraction 0.99 -> int(10 x 0.99) = 9, the first 9 steps trained
        noise_level=0.7,  # base.py: sample.noise_level 0.7
        group_size=24, prompts_per_iter=48,  # grpo.py: num_image_per_prompt 24, 48 prompts per epoch
        micro_batch=9, optimizer_steps=2,  # grpo.py: train_batch_size 9; gradient_accumulation = batches / 2
        lr=3e-4, weight_decay=1e-4, grad_clip=1.0,  # base.py: learning_rate, adam_weight_decay, max_grad_norm
        clip_low=1e-4, clip_high=1e-4, adv_clip=5.0,  # base.py: clip_range 1e-4, adv_clip_max 5
        beta=0.04, kl_convention="flow_grpo",  # grpo.py: train.beta 0.04 on train_sd3.py's KL / (2 std_dev_t^2)
        advantage_options={"scale": "batch"},  # grpo.py: sample.global_std True
        zero_std="drop",  # train_sd3.py: samples whose advantages are all zero are filtered out
        ema_decay=0.9 ** 0.25,  # train_sd3.py: EMAModuleWrapper(decay 0.9, update_step_interval 8): 8 of its
        # optimizer steps are 4 iterations here, so 0.9 per 4 iterations
        reward="shapes", prompts="prompts.jsonl", eval_prompts="prompts.jsonl", out="runs/sd35-grpo",
        max_minutes=0.0, iterations=2000, family_options={"max_sequence_length": 128}),
    # DiffusionNFT's SD3.5-M GenEval recipe (NVlabs/DiffusionNFT config/nft.py sd3_geneval over config/base.py, and
    # scripts/train_nft_sd3.py); pass --model PATH and --reward / --prompts of the task.
    "sd35-medium-nft": dict(
        model="", strategy="diffusion_nft", precision="bf16", height=512, width=512,  # nft.py: resolution 512
        lora_rank=32, lora_alpha=64,  # train_nft_sd3.py: LoraConfig(r=32, lora_alpha=64, gaussian init)
        num_steps=10, eval_num_steps=40,  # nft.py: sample.num_steps 10, eval_num_steps 40
        guidance=1.0,  # nft.py: sample.guidance_scale = 1.0 (CFG-free collection and evaluation)
        group_size=24, prompts_per_iter=48,  # nft.py: num_image_per_prompt 24, num_groups 48
        micro_batch=9, optimizer_steps=1,  # nft.py: bsz 9 per GPU; sd3_geneval: gradient_step_per_epoch 1
        lr=3e-4, weight_decay=1e-4, grad_clip=1.0,  # base.py: learning_rate, adam_weight_decay, max_grad_norm
        beta=1e-4,  # nft.py: train.beta (KL to the reference)
        advantage_options={"scale": "batch"},  # base.py: per_prompt_stat_tracking with sample.global_std True
        ema_decay=0.9,  # train_nft_sd3.py: EMAModuleWrapper(decay=0.9), the evaluated weights
        diffusion_nft=dict(beta=1.0,  # nft.py: config.beta 1.0
                           adv_clip_max=5.0,  # base.py: train.adv_clip_max 5
                           time_fraction=0.99,  # base.py: train.timestep_fraction 0.99
                           ode_solver="dpm2",  # nft.py: sample.solver "dpm2", deterministic
                           lag_flat=0, lag_rate=0.001, lag_cap=0.5),  # nft.py: decay_type 1
        out="runs/sd35-nft", iterations=2000, max_minutes=0.0, family_options={"max_sequence_length": 128}),
    # AWM on SD3.5-M (X-GenGroup/Flow-Factory examples/awm/lora/sd3_5/default.yaml, src/flow_factory/trainers/awm.py);
    # its clip_range 1 is inert there as here: one on-policy optimizer step per iteration keeps the ratio at 1.
    "sd35-medium-awm": dict(
        model="", strategy="awm", precision="bf16", height=512, width=512,  # train/eval.resolution 512
        lora_rank=32, lora_alpha=64,  # model.lora_rank 32, lora_alpha 64
        num_steps=14, eval_num_steps=40,  # train.num_inference_steps 14, eval.num_inference_steps 40
        guidance=1.0,  # train/eval.guidance_scale 1.0
        group_size=16, prompts_per_iter=48,  # train.group_size 16, unique_sample_num_per_epoch 48
        micro_batch=8, optimizer_steps=1,  # per_device_batch_size 8, gradient_step_per_epoch 1
        lr=3e-4, weight_decay=1e-4, grad_clip=1.0,  # learning_rate, adam_weight_decay, max_grad_norm
        beta=1e-4,  # kl_beta 1e-4, kl_type v-based (‖v - v_ref‖²)
        adv_clip=1.0,  # adv_clip_range 1.0
        advantage_options={"scale": "batch"},  # global_std true
        awm=dict(weighting="ghuber", ghuber_power=0.25,  # awm_weighting, ghuber_power
                 train_levels=6, time_range=0.9,  # num_train_timesteps 6, discrete_wo_init, timestep_range 0.9
                 ema_kl=1.0, ema_cap=0.3, ema_warmup=1000,  # ema_kl_beta 1, ema_decay 0.3 linear, warmup_steps 1000
                 ode_solver="euler"),  # scheduler.dynamics_type ODE
        out="runs/sd35-awm", iterations=2000, max_minutes=0.0, family_options={"max_sequence_length": 128}),
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


# Options that were flat before each strategy owned its own: old name -> (strategy, option). The old names are read,
# with a warning, for one more release. `train_steps` is read as Co-GRPO's model steps (DanceGRPO's count of trained
# steps became its timestep_fraction, which the old integer does not translate to).
MOVED = {
    "window_shift_every": ("mixgrpo", "window_shift_every"), "window_stride": ("mixgrpo", "window_stride"),
    "window_end": ("mixgrpo", "window_end"), "ode_solver": ("mixgrpo", "ode_solver"),
    "ode_compress": ("mixgrpo", "ode_compress"), "granularities": ("g2rpo", "granularities"),
    "calibrate_iterations": ("dense_grpo", "calibrate_iterations"),
    "calibrate_balance": ("dense_grpo", "calibrate_balance"), "calibrate_step": ("dense_grpo", "calibrate_step"),
    "co_mode": ("co_grpo", "mode"), "schedule_lr": ("co_grpo", "schedule_lr"),
    "schedule_std": ("co_grpo", "schedule_std"), "train_steps": ("co_grpo", "model_steps"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _gather_strategy_options(values: dict) -> dict:
    """``values`` with every strategy option (``{strategy: {option: value}}`` mappings, ``strategy.option`` keys and
    the old flat names) moved into ``strategy_options``: those of the run's strategy only; any other's is an error."""
    model = values.get("model", str(SHAPES_MODEL))
    mdm = bool(model) and is_mdm(model)
    name = values.get("strategy") or ("co_grpo" if mdm else "g2rpo")
    per: dict[str, dict] = {"strategy_options": dict(values.pop("strategy_options", None) or {})}
    for key in list(values):
        if key in STRATEGIES:  # a mapping under the strategy's name (YAML, presets)
            given = values.pop(key)
            if not isinstance(given, dict):
                raise ConfigError(f"{key}: expected a mapping of the strategy's options, got {given!r}")
            per.setdefault(key, {}).update(given)
        elif key.split(".", 1)[0] in STRATEGIES and "." in key:  # --mixgrpo.window-end
            strategy, option = key.split(".", 1)
            per.setdefault(strategy, {})[option] = values.pop(key)
        elif key in MOVED:
            strategy, option = MOVED[key]
            warnings.warn(f"{flag(key)} ({key}) is now {flag(strategy + '.' + option)} ({strategy}: {{{option}: ...}} "
                          "in YAML); the old name is read for one more release", FutureWarning, stacklevel=3)
            per.setdefault(strategy, {})[option] = values.pop(key)
    others = sorted(f"{flag(s + '.' + o)} (an option of strategy {s})" for s, given in per.items()
                    if s not in (name, "strategy_options") for o in given)
    fits = name not in STRATEGIES or STRATEGIES[name].kind == ("mdm" if mdm else "flow")
    if others and fits:  # (a strategy for another kind of model is refused by TrainConfig, saying so)
        raise ConfigError(f"{', '.join(others)}: this run's strategy is {name}")
    values["strategy_options"] = {**per["strategy_options"], **per.get(name, {})}
    return values


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
        _merge(values, loaded)
    _merge(values, overrides or {})
    values = _gather_strategy_options(values)
    _strategy_defaults(values)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; see `flowgrpo train --help`")
    cfg = TrainConfig(**{k: _coerce(k, v, defaults[k]) for k, v in values.items()})
    if not cfg.model:
        raise ConfigError(f"preset {preset!r} needs --model PATH: a local diffusers pipeline directory")
    return cfg


def _strategy_defaults(values: dict) -> None:
    """A strategy's own values of the run's settings (its paper's SDE step, noise, advantage std), where the preset,
    the YAML and the command line give none."""
    cls = STRATEGIES.get(values.get("strategy") or "")
    if cls is None:
        return
    for key, value in cls.run_defaults.items():
        values.setdefault(key, value)
    if values.get("advantage", "grpo") == "grpo" and "advantage_options" not in values:
        values["advantage_options"] = dict(cls.grpo_defaults)


def _merge(values: dict, later: dict) -> None:
    """``later`` over ``values``; a strategy's mapping of options merges with the one before it."""
    for key, value in later.items():
        if key in STRATEGIES and isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field, one --<strategy>.<option> per strategy option (default None = not given,
    so presets and YAML apply); the old flat names of strategy options are read but not shown."""
    for f in fields(TrainConfig):
        if f.name == "strategy_options":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = "bool" if isinstance(default, bool) else "mapping (YAML)" if isinstance(default, dict) else type(default).__name__
        parser.add_argument(flag(f.name), dest=f.name, default=None, metavar=kind.upper(),
                            help=f"{f.metadata['help']} (shapes preset: {PRESETS['shapes'].get(f.name, default)!r})")
    for name, cls in STRATEGIES.items():
        group = parser.add_argument_group(f"strategy {name}", " ".join((cls.__doc__ or "").split()).replace("%", "%%"))
        for f in fields(cls.Options):
            text = f"{f.metadata['help']} (default {f.default!r})".replace("%", "%%")  # argparse formats help
            group.add_argument(flag(f"{name}.{f.name}"), dest=f"{name}.{f.name}", default=None,
                               metavar=type(f.default).__name__.upper(), help=text)
    for old in MOVED:
        parser.add_argument(flag(old), dest=old, default=None, help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = [f.name for f in fields(TrainConfig) if f.name != "strategy_options"] + list(MOVED)
    names += [f"{n}.{f.name}" for n, cls in STRATEGIES.items() for f in fields(cls.Options)]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
