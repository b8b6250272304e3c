"""`flowgrpo train`: GRPO for text-to-image models — setup, iterate, finish. The run's rollout strategy
(`flowgrpo.strategies`: Flow-GRPO, DanceGRPO, MixGRPO, G²RPO, DenseGRPO on flow-matching pipelines, Co-GRPO on masked
diffusion models) is the trainer's task.

Runs on one process or many (`torchrun` / `accelerate launch`): the batch sizes are global, every draw is keyed by
(seed, iteration, sample), so the run does not depend on the number of processes; process 0 writes the files.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowgrpo.config import ConfigError, TrainConfig, check_tag_weights
from flowgrpo.distributed import Dist
from flowgrpo.eval.evaluators import EvalResult, Evaluator, ImageSampling, image_evaluator
from flowgrpo.eval.plots import line_plot
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.prompts.loaders import load_prompts, ordered_tags, tag_balanced_indices
from flowgrpo.rewards import build_judge, build_reward
from flowgrpo.samplers.noise import Stream, keyed_rng
from flowgrpo.strategies import STRATEGIES, ImageScoring, Strategy
from flowgrpo.trainer import Trainer, settings_json

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def load_mdm_policy(cfg: TrainConfig, micro_batch: int, device: torch.device | str = "cpu") -> MaskedDiffusionPolicy:
    """A masked diffusion model with its schedule (or the hand-set one of num_steps steps at CFG guidance), in
    micro-batches of the trainer's forward passes (rollouts sample in the batches the update recomputes), with the
    parts Co-GRPO trains."""
    options = cfg.strategy_options
    policy = MaskedDiffusionPolicy.from_pretrained(cfg.model, micro_batch=micro_batch, num_steps=cfg.num_steps,
                                                   guidance=cfg.guidance, mode=options.mode,
                                                   schedule_std=options.schedule_std)
    if policy.schedule.num_steps != cfg.num_steps:
        raise ConfigError(f"{cfg.model} samples with its own schedule of {policy.schedule.num_steps} steps; "
                          f"num_steps={cfg.num_steps} must match it")
    policy.to(device)
    if cfg.beta > 0:
        policy.freeze_reference()  # the base model and schedule, before any checkpoint is restored
    return policy


def load_policy(cfg: TrainConfig, device: torch.device | str = "cpu") -> FlowPolicy:
    policy = FlowPolicy.from_pretrained(cfg.model, height=cfg.height or None, width=cfg.width or None,
                                        micro_batch=cfg.micro_batch, family_options=cfg.family_options)
    policy.autocast = AUTOCAST[cfg.precision]
    if cfg.lora_rank:
        policy.add_lora(cfg.lora_rank, cfg.lora_alpha or None, seed=cfg.seed)
    if cfg.trainable:
        policy.train_only(cfg.trainable)
    policy.to(device)
    if cfg.beta > 0:
        policy.freeze_reference()  # the base weights, before any checkpoint is restored
    return policy


def make_task(cfg: TrainConfig, dist: Dist, scoring: ImageScoring) -> tuple[Strategy, torch.optim.Optimizer | None]:
    """The run's strategy on its policy, and the optimizer when the trainer's default (the configured one at lr on
    every trained parameter) does not fit: a masked diffusion model's schedule trains at its own learning rate."""
    strategy, optimizer = STRATEGIES[cfg.strategy], None
    if strategy.kind == "mdm":
        policy = load_mdm_policy(cfg, cfg.layout(dist.world_size).micro_batch, dist.device)
        optimizer = cfg.make_optimizer(policy.param_groups(cfg.strategy_options.schedule_lr, cfg.lr))
    else:
        policy = load_policy(cfg, dist.device)
    return strategy(policy, cfg.strategy_options, cfg.sampling, scoring), optimizer


def build_scoring(cfg: TrainConfig) -> ImageScoring:
    """The run's reward and pairwise judge (their options are checked by their constructors: config errors)."""
    try:
        reward_fn = build_reward(cfg.reward, **cfg.reward_options)
        judge = build_judge(cfg.judge, **cfg.judge_options) if cfg.judge else None
    except ValueError as e:
        raise ConfigError(f"reward/judge options: {e}") from e
    return ImageScoring(reward_fn, judge, cfg.pointwise_weight)


def build_trainer(cfg: TrainConfig, dist: Dist, scoring: ImageScoring | None = None, *,
                  trackers: bool = False) -> Trainer:
    """The trainer `flowgrpo train` runs for ``cfg`` on ``dist``'s processes (its task: the strategy); with
    ``trackers`` it logs to the accelerator's (TensorBoard by default)."""
    task, optimizer = make_task(cfg, dist, scoring or build_scoring(cfg))
    acc = dist.accelerator
    return Trainer(task, cfg, dist, config_json=settings_json(cfg), optimizer=optimizer, ema_decay=cfg.ema_decay,
                   log=(lambda metrics, step: acc.log(metrics, step=step)) if trackers else None,
                   log_images=(lambda images, step: log_images(acc, images, step)) if trackers else None)


def log_images(accelerator, images: dict, step: int) -> None:
    """Named PIL images to every tracker that takes images (TensorBoard as an HWC batch of one)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: np.asarray(v)[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)


def draw_prompts(entries: list[dict], cfg: TrainConfig, iteration: int) -> list[dict]:
    """The iteration's prompts_per_iter entries — tag-balanced (or tag-weighted) when entries have tags — from a
    generator keyed by (seed, iteration): every process draws the same ones, and a resumed run needs no state."""
    rng = keyed_rng(cfg.seed, Stream.PROMPTS, iteration)
    if all("tag" in e for e in entries):  # balanced over the tags present, whatever they are
        idx = tag_balanced_indices(entries, cfg.prompts_per_iter, rng, cfg.tag_weights)
    else:
        idx = rng.integers(len(entries), size=cfg.prompts_per_iter)
    return [entries[i] for i in idx]


class Evaluation:
    """The run's evaluations with its one evaluator (split over its processes), always in fp32 and with the EMA
    weights when the run keeps them: reports and grids under out/eval/NAME, the scores in the training history and the
    trackers (scalars, the grid and the curve of every evaluation so far)."""

    def __init__(self, trainer: Trainer, evaluator: Evaluator, out: Path, eval_every: int):
        self.trainer, self.evaluator, self.out, self.eval_every = trainer, evaluator, out, eval_every

    def weights(self):
        ema, module = self.trainer.ema, self.trainer.task.policy.trainable_module()
        return ema.applied(module) if ema is not None else contextlib.nullcontext()

    def run(self, name: str, evaluator: Evaluator | None = None, history: str = "eval") -> EvalResult:
        """Evaluate the current weights with the run's evaluator (or ``evaluator``), kept in ``history``."""
        trainer, policy = self.trainer, self.trainer.task.policy
        with self.weights(), policy.precision(None):
            result = (evaluator or self.evaluator).run(policy, trainer.dist)
        trainer.state.history.setdefault(history, []).append({"iteration": trainer.state.iteration, **result.summary()})
        if trainer.dist.is_main:
            result.write(self.out / "eval" / name, name)
            trainer.task.report(self.out)
        return result

    def after_step(self, metrics: dict) -> None:
        if self.trainer.state.iteration % self.eval_every == 0:
            self.report(self.run(f"iter{self.trainer.state.iteration:05d}"))

    def report(self, result: EvalResult) -> None:
        """Log an evaluation to the trackers and the console (process 0)."""
        trainer = self.trainer
        if not trainer.dist.is_main:
            return
        it = trainer.state.iteration
        trainer.log(result.metrics(), it)
        images = {"eval/grid": result.grid_image(), "eval/curve": self.curve()}
        trainer.log_images({k: v for k, v in images.items() if v is not None}, it)
        tqdm.write(f"iteration {it}: {result.line()} (grid {self.out / 'eval' / f'iter{it:05d}' / 'grid.png'})")

    def curve(self):
        """eval/curve.png: the evaluator's score (± 1 standard error) at every evaluation so far, as an image."""
        from PIL import Image

        records = self.trainer.state.history["eval"]
        scores = [self.evaluator.score(r) for r in records]
        path = line_plot({self.evaluator.name: ([r["iteration"] for r in records], [s for s, _ in scores],
                                                [e for _, e in scores])},
                         self.out / "eval" / "curve.png", title=f"{self.evaluator.name} during training",
                         xlabel="iteration", ylabel=self.evaluator.name)
        with Image.open(path) as img:
            return img.convert("RGB")


def make_evaluator(cfg: TrainConfig, entries: list[dict], reward_fn, kind: str,
                   guidance: float | None = None) -> Evaluator:
    """The run's evaluator: GenEval accuracy for GenEval metadata, else the training reward's mean, at CFG
    ``guidance`` (default the run's); a masked diffusion model samples with its own (learned) schedule."""
    own_schedule = kind == "mdm"
    sampling = ImageSampling(cfg.eval_images_per_prompt, None if own_schedule else cfg.eval_num_steps,
                             None if own_schedule else guidance or cfg.guidance, cfg.seed)
    return image_evaluator(entries, reward_fn, sampling)


def train(cfg: TrainConfig) -> dict:
    # ---- setup: inputs first, so a mistyped command fails before the model loads or anything is written
    scoring = build_scoring(cfg)
    train_entries, eval_entries = load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts)
    check_tag_weights(cfg.tag_weights, ordered_tags(train_entries))
    out = Path(cfg.out)
    dist = Dist.create(log_with=cfg.log_with or None, project_dir=str(out))
    layout = cfg.layout(dist.world_size)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(settings_json(cfg), indent=1))
        dist.accelerator.init_trackers("flowgrpo", config={k: v for k, v in settings_json(cfg).items()
                                                           if isinstance(v, (int, float, str, bool))})
        tqdm.write(f"training on {dist.world_size} process(es) ({dist.device}): {layout.samples} samples per "
                   f"iteration, {layout.per_process} per process in forward passes of {layout.micro_batch}")
    trainer = build_trainer(cfg, dist, scoring, trackers=True)
    policy = trainer.task.policy
    trainer.resume()
    evaluator = make_evaluator(cfg, eval_entries, scoring.reward_fn, trainer.task.kind)
    evaluation = Evaluation(trainer, evaluator, out, cfg.eval_every)
    # the base and the final model also at --eval-guidance (e.g. CFG-free), kept in history["eval_guidance"]
    other = cfg.eval_guidance and make_evaluator(cfg, eval_entries, scoring.reward_fn, trainer.task.kind,
                                                 cfg.eval_guidance)
    at_other = f"cfg{cfg.eval_guidance:g}"
    if not trainer.state.history["eval"]:
        base = evaluation.run("base")
        if dist.is_main:
            tqdm.write(f"base model: {base.line()}\n{evaluator.table({'base': base.summary()}, brief=True)}")
        if other:
            base = evaluation.run(f"base-{at_other}", other, "eval_guidance")
            if dist.is_main:
                tqdm.write(f"base model at CFG {cfg.eval_guidance:g}: {base.line()}")

    # ---- iterate
    trainer.fit(lambda it: draw_prompts(train_entries, cfg, it), iterations=cfg.iterations,
                max_minutes=cfg.max_minutes, after_step=evaluation.after_step)

    # ---- finish: a last evaluation, the checkpoint, the exported model, base vs trained
    if trainer.state.history["eval"][-1]["iteration"] != trainer.state.iteration:
        evaluation.report(evaluation.run(f"iter{trainer.state.iteration:05d}"))
    if other and trainer.state.history.get("eval_guidance", [{}])[-1].get("iteration") != trainer.state.iteration:
        evaluation.run(f"iter{trainer.state.iteration:05d}-{at_other}", other, "eval_guidance")
    trainer.save()
    with evaluation.weights():
        whole = policy.whole_state_dict()  # gathered on every process when the weights are sharded
        if dist.is_main:
            policy.save(out / "final", whole)
    dist.accelerator.end_training()
    return finish(trainer, evaluator, out)


def finish(trainer: Trainer, evaluator: Evaluator, out: Path) -> dict:
    """Print and write base vs trained (the evaluator's table) from the evaluation history (process 0)."""
    state = trainer.state
    base, last = state.history["eval"][0], state.history["eval"][-1]
    summary = {"base": base, "trained": last, "iterations": state.iteration,
               "train_minutes": state.train_seconds / 60, "processes": trainer.dist.world_size, "out": str(out)}
    if not trainer.dist.is_main:
        return summary
    records = {"base": base, f"trained ({state.iteration} it)": last}
    if len(state.history.get("eval_guidance", [])) >= 2:  # the same models at --eval-guidance
        cfg_base, cfg_last = state.history["eval_guidance"][0], state.history["eval_guidance"][-1]
        summary |= {"guidance": trainer.cfg.guidance, "eval_guidance": trainer.cfg.eval_guidance,
                    "base_at_eval_guidance": cfg_base, "trained_at_eval_guidance": cfg_last}
        g = f"CFG {trainer.cfg.eval_guidance:g}"
        records = {f"base (CFG {trainer.cfg.guidance:g})": base, f"base ({g})": cfg_base,
                   f"trained ({state.iteration} it, CFG {trainer.cfg.guidance:g})": last,
                   f"trained ({state.iteration} it, {g})": cfg_last}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(evaluator.table(records))
    print(f"\n{evaluator.table(records, brief=True)}\n{evaluator.change(base, last)} after "
          f"{state.train_seconds / 60:.1f} min of training")
    print(f"grids: {out / 'eval'}/*/grid.png   report: {out / 'report.md'}   tensorboard --logdir {out}")
    return summary
