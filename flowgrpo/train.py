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

import torch
from tqdm import tqdm

from flowgrpo.config import ConfigError, TrainConfig, check_tag_weights
from flowgrpo.distributed import Dist
from flowgrpo.eval.geneval import GenevalResult, evaluate, markdown_table, report_markdown, write_report
from flowgrpo.eval.reward_eval import RewardEvalResult, evaluate_reward, is_geneval, write_reward_report
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
        policy.add_lora(cfg.lora_rank, seed=cfg.seed)
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


def build_trainer(cfg: TrainConfig, dist: Dist, scoring: ImageScoring | None = None, log=None) -> Trainer:
    """The trainer `flowgrpo train` runs for ``cfg`` on ``dist``'s processes (its task: the strategy)."""
    task, optimizer = make_task(cfg, dist, scoring or build_scoring(cfg))
    return Trainer(task, cfg, dist, config_json=settings_json(cfg), optimizer=optimizer, ema_decay=cfg.ema_decay,
                   log=log)


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
    """Evaluations of the run (split over its processes): GenEval accuracy when the eval prompts carry GenEval
    metadata, else the training reward's mean. Always in fp32, with the EMA weights when the run keeps them."""

    def __init__(self, trainer: Trainer, entries: list[dict], cfg: TrainConfig, reward_fn):
        self.trainer, self.entries, self.cfg, self.reward_fn = trainer, entries, cfg, reward_fn
        self.out = Path(cfg.out)

    def weights(self):
        ema, module = self.trainer.ema, self.trainer.task.policy.trainable_module()
        return ema.applied(module) if ema is not None else contextlib.nullcontext()

    def run(self, name: str) -> GenevalResult | RewardEvalResult:
        cfg, policy, dist = self.cfg, self.trainer.task.policy, self.trainer.dist
        mdm = self.trainer.task.kind == "mdm"  # samples with its own (learned) schedule, in fp32
        kw = dict(images_per_prompt=cfg.eval_images_per_prompt, num_steps=None if mdm else cfg.eval_num_steps,
                  guidance=None if mdm else cfg.guidance, seed=cfg.seed, dist=dist)
        with self.weights(), contextlib.nullcontext() if mdm else policy.precision(None):
            if is_geneval(self.entries):
                result = evaluate(policy, self.entries, **kw)
                write = write_report
            else:
                result = evaluate_reward(policy, self.entries, self.reward_fn, **kw)
                write = write_reward_report
        if dist.is_main:
            write(result, self.out / "eval" / name, **({"name": name} if write is write_report else {}))
            self.trainer.task.report(self.out)
        self.trainer.state.history["eval"].append({"iteration": self.trainer.state.iteration, **result.summary()})
        return result

    def after_step(self, metrics: dict) -> None:
        if self.trainer.state.iteration % self.cfg.eval_every == 0:
            self.report(self.run(f"iter{self.trainer.state.iteration:05d}"))

    def report(self, r: GenevalResult | RewardEvalResult) -> None:
        """Log an evaluation to the trackers and the console (process 0)."""
        trainer = self.trainer
        if not trainer.dist.is_main:
            return
        it, grid = trainer.state.iteration, self.out / "eval" / f"iter{trainer.state.iteration:05d}" / "grid.png"
        if isinstance(r, RewardEvalResult):
            trainer.log({"eval/reward": r.mean}, it)
            tqdm.write(f"iteration {it}: eval reward {r.mean:.4f} ± {r.stderr:.4f} (grid {grid})")
            return
        trainer.log({f"eval/{k}": v for k, v in r.accuracy.items()} | {
            "eval/malformed": r.malformed, "eval/background_noise": r.background_noise, "eval/diversity": r.diversity}, it)
        tqdm.write(f"iteration {it}: overall {100 * r.accuracy['overall']:.1f}% (malformed {100 * r.malformed:.1f}%, "
                   f"grid {grid})")


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
    trainer = build_trainer(cfg, dist, scoring, log=lambda metrics, step: dist.accelerator.log(metrics, step=step))
    policy = trainer.task.policy
    trainer.resume()
    evaluation = Evaluation(trainer, eval_entries, cfg, scoring.reward_fn)
    if not trainer.state.history["eval"]:
        base = evaluation.run("base")
        if dist.is_main:
            tqdm.write("base model: " + (f"eval reward {base.mean:.4f} ± {base.stderr:.4f}"
                                         if isinstance(base, RewardEvalResult) else "\n" + markdown_table({"base": base.summary()})))

    # ---- iterate
    trainer.fit(lambda it: draw_prompts(train_entries, cfg, it), iterations=cfg.iterations,
                max_minutes=cfg.max_minutes, after_step=evaluation.after_step)

    # ---- finish: a last evaluation, the checkpoint, the exported model, base vs trained
    if trainer.state.history["eval"][-1]["iteration"] != trainer.state.iteration:
        evaluation.report(evaluation.run(f"iter{trainer.state.iteration:05d}"))
    trainer.save()
    with evaluation.weights():
        whole = policy.whole_state_dict()  # gathered on every process when the weights are sharded
        if dist.is_main:
            policy.save(out / "final", whole)
    dist.accelerator.end_training()
    return finish(trainer, out)


def finish(trainer: Trainer, out: Path) -> dict:
    """Print and write base vs trained accuracy (or eval reward) from the evaluation history (process 0)."""
    state = trainer.state
    base, last = state.history["eval"][0], state.history["eval"][-1]
    summary = {"base": base, "trained": last, "iterations": state.iteration,
               "train_minutes": state.train_seconds / 60, "processes": trainer.dist.world_size, "out": str(out)}
    if not trainer.dist.is_main:
        return summary
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if "reward" in base:  # eval prompts without GenEval metadata: the training reward (per tag when tagged)
        tags = list(base.get("reward_by_tag", {}))
        table = "| model | eval reward | " + " | ".join(tags) + " |\n|---|---|" + "---|" * len(tags) + "\n" + "\n".join(
            f"| {name} | {rec['reward']:.4f} ± {rec['reward_stderr']:.4f} | "
            + " | ".join(f"{rec['reward_by_tag'][t]:.4f}" for t in tags) + " |"
            for name, rec in (("base", base), (f"trained ({state.iteration} it)", last)))
        (out / "report.md").write_text(table + "\n")
        print(f"\n{table}\n\ngrids: {out / 'eval'}/*/grid.png   tensorboard --logdir {out}")
        return summary
    models = {"base": base, f"trained ({state.iteration} it)": last}
    (out / "report.md").write_text(report_markdown(models))  # with why images failed, per tag
    print(f"\n{markdown_table(models)}\n\noverall accuracy {100 * base['accuracy']['overall']:.1f}% -> "
          f"{100 * last['accuracy']['overall']:.1f}% after {state.train_seconds / 60:.1f} min of training")
    print(f"grids: {out / 'eval'}/*/grid.png   report: {out / 'report.md'}   tensorboard --logdir {out}")
    return summary
