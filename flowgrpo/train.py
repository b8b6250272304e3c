"""`flowgrpo train`: the GRPO training loop for flow-matching text-to-image models.

Read top to bottom: load policy, reward and prompts; restore the training state if a checkpoint
exists; evaluate the base model once; then iterate rollout -> reward -> advantages -> update,
evaluating and checkpointing on schedule; finish with base-vs-trained accuracy.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from flowgrpo.checkpoint import TrainState, load_checkpoint, save_checkpoint
from flowgrpo.config import ConfigError, TrainConfig
from flowgrpo.core import TRACKED_ESTIMATORS, AdvantageResult, compute_advantages
from flowgrpo.ema import WeightEMA
from flowgrpo.eval.geneval import GenevalResult, evaluate, markdown_table, report_markdown, write_report
from flowgrpo.eval.reward_eval import RewardEvalResult, evaluate_reward, is_geneval, write_reward_report
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.pref import pref_advantages
from flowgrpo.rewards import build_judge, build_reward
from flowgrpo.samplers.rollout import group_noise, singular_branch_mask
from flowgrpo.samplers.schedules import offset_schedule
from flowgrpo.shapes.data import tag_balanced_indices
from flowgrpo.update import budget_progress, grpo_update, scheduled_lr, train_step_indices

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def load_policy(cfg: TrainConfig) -> FlowPolicy:
    policy = FlowPolicy.from_pretrained(cfg.model, height=cfg.height or None, width=cfg.width or None,
                                        micro_batch=cfg.micro_batch, family_options=cfg.family_options)
    policy.autocast = AUTOCAST[cfg.precision]
    if cfg.lora_rank:
        policy.add_lora(cfg.lora_rank, seed=cfg.seed)
    if cfg.trainable:
        policy.train_only(cfg.trainable)
    if cfg.beta > 0:
        policy.freeze_reference()  # the base weights, before any checkpoint is restored
    return policy


def sde_mask_for(cfg: TrainConfig, group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """flow_grpo: SDE on every step of the window, [T]. g2rpo: one branch step per group in the window, [B, T].
    CPS's last step (to sigma 0) has no noise, so it always runs as ODE."""
    num_steps = cfg.num_steps
    usable = num_steps - 1 if cfg.sde_kind == "cps" else num_steps
    if cfg.strategy == "g2rpo":
        window = min(cfg.sde_steps or max(num_steps // 2, 1), usable)
        return singular_branch_mask(group_ids, window, num_steps, generator)
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[: min(cfg.sde_steps or num_steps, usable)] = True
    return mask


def rollout_advantages(cfg: TrainConfig, ro, rewards: torch.Tensor, judge, tracker) -> AdvantageResult:
    """Pref-GRPO win rates when a judge is set, else the pointwise estimator (with the per-prompt tracker if it keeps one)."""
    if judge is not None:
        return pref_advantages(judge, ro, rewards, cfg)
    opts = dict(cfg.advantage_options)
    if cfg.advantage in TRACKED_ESTIMATORS:
        opts.update(tracker=tracker, prompt_keys=ro.prompts)
    return compute_advantages(cfg.advantage, rewards, ro.group_ids, adv_clip=cfg.adv_clip, zero_std=cfg.zero_std,
                              **opts)


def granular_advantages(cfg: TrainConfig, policy: FlowPolicy, ro, rewards: torch.Tensor, reward_fn, judge,
                        tracker) -> AdvantageResult:
    """`rollout_advantages` of the sampled images, plus (G²RPO multi-granularity) those of the same branches
    finished on each coarser schedule, summed; a row is valid only if it is valid at every granularity."""
    adv = rollout_advantages(cfg, ro, rewards, judge, tracker)
    total, valid, stats = adv.advantages.clone(), adv.valid.clone(), dict(adv.stats)
    for lam in range(2, cfg.granularities + 1):
        coarse = replace(ro, images=policy.finish_coarse(ro, lam, cfg.guidance))
        r = reward_fn(coarse.images, coarse.prompts, coarse.metadata)
        a = rollout_advantages(cfg, coarse, r, judge, tracker)
        total, valid = total + a.advantages, valid & a.valid
        stats[f"reward_granularity{lam}"] = float(r.nanmean())
    return AdvantageResult(torch.where(valid, total, torch.zeros_like(total)), valid, stats)


def sample_groups(entries: list[dict], cfg: TrainConfig, rng: np.random.Generator, process_index: int):
    """prompts_per_iter entries (tag-balanced, or tag-weighted, when entries have tags), each repeated group_size times."""
    if all("tag" in e for e in entries):
        idx = tag_balanced_indices(entries, cfg.prompts_per_iter, rng, cfg.tag_weights)
    else:
        idx = rng.integers(len(entries), size=cfg.prompts_per_iter)
    picked = [entries[i] for i in idx for _ in range(cfg.group_size)]
    group_ids = torch.arange(cfg.prompts_per_iter).repeat_interleave(cfg.group_size) + process_index * cfg.prompts_per_iter
    return picked, group_ids


def run_eval(policy: FlowPolicy, entries: list[dict], cfg: TrainConfig, out: Path, name: str,
             reward_fn) -> GenevalResult | RewardEvalResult:
    """GenEval accuracy when the eval prompts carry GenEval metadata; otherwise the training reward's mean.
    Always in fp32, so base and trained numbers do not depend on the training precision."""
    with policy.precision(None):
        return _run_eval(policy, entries, cfg, out, name, reward_fn)


def _run_eval(policy, entries, cfg, out, name, reward_fn):
    kw = dict(images_per_prompt=cfg.eval_images_per_prompt, num_steps=cfg.eval_num_steps, guidance=cfg.guidance,
              seed=cfg.seed)
    if not is_geneval(entries):
        result = evaluate_reward(policy, entries, reward_fn, **kw)
        write_reward_report(result, out / "eval" / name)
        return result
    result = evaluate(policy, entries, **kw)
    write_report(result, out / "eval" / name, name=name)
    return result


def train(cfg: TrainConfig) -> dict:
    try:  # option values are checked by the constructors: report them as the config errors they are
        reward_fn = build_reward(cfg.reward, **cfg.reward_options)
        judge = build_judge(cfg.judge, **cfg.judge_options) if cfg.judge else None
    except ValueError as e:
        raise ConfigError(f"reward/judge options: {e}") from e
    train_entries, eval_entries = load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    accel = Accelerator(log_with=cfg.log_with or None, project_dir=str(out))
    if accel.num_processes > 1:
        raise NotImplementedError("multi-process training is not supported yet; run one process")
    accel.init_trackers("flowgrpo", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    policy = load_policy(cfg)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint"
    ema = WeightEMA(policy.transformer, cfg.ema_decay) if cfg.ema_decay else None
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt, policy.transformer, optimizer, ema)
        tqdm.write(f"resumed from {ckpt} at iteration {state.iteration}")
    else:
        state = TrainState.fresh(cfg.seed, accel.process_index)
        state.ema = ema
    sigmas = policy.sigmas(cfg.num_steps)
    fine = policy.sigmas(cfg.num_steps * cfg.schedule_jitter) if cfg.schedule_jitter else None

    results: dict[str, GenevalResult | RewardEvalResult] = {}
    if not state.history["eval"]:
        results["base"] = run_eval(policy, eval_entries, cfg, out, "base", reward_fn)
        state.history["eval"].append({"iteration": 0, **results["base"].summary()})
        r = results["base"]
        tqdm.write("base model: " + (f"eval reward {r.mean:.4f} ± {r.stderr:.4f}" if isinstance(r, RewardEvalResult)
                                     else "\n" + markdown_table({"base": r.summary()})))

    bar = tqdm(total=cfg.iterations, initial=state.iteration, desc="grpo")
    while state.iteration < cfg.iterations:
        if cfg.max_minutes and state.train_seconds >= 60 * cfg.max_minutes:
            tqdm.write(f"time budget reached ({cfg.max_minutes} min of training)")
            break
        t0 = time.time()
        entries, group_ids = sample_groups(train_entries, cfg, state.prompt_rng, accel.process_index)
        x_init = group_noise(cfg.prompts_per_iter, cfg.group_size, policy.latent_shape(),
                             generator=state.rollout_rng, shared=cfg.shared_noise)
        if fine is not None:
            offset = int(torch.randint(1, cfg.schedule_jitter + 1, (1,), generator=state.rollout_rng))
            sigmas = offset_schedule(fine, cfg.num_steps, offset)
        ro = policy.rollout([e["prompt"] for e in entries], entries, group_ids, x_init, sigmas=sigmas,
                            sde_mask=sde_mask_for(cfg, group_ids, state.rollout_rng), guidance=cfg.guidance, kind=cfg.sde_kind,
                            noise_level=cfg.noise_level, generator=state.rollout_rng, antithetic=cfg.antithetic,
                            noise_freqs=cfg.noise_freqs)
        rewards = reward_fn(ro.images, ro.prompts, ro.metadata)
        adv = granular_advantages(cfg, policy, ro, rewards, reward_fn, judge, state.tracker)
        steps = train_step_indices(ro, cfg, state.rollout_rng)
        lr = scheduled_lr(cfg, budget_progress(cfg, state.iteration, state.train_seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = grpo_update(policy, optimizer, params, ro, adv, steps, cfg)
        if state.ema is not None:
            state.ema.update(policy.transformer)
        state.iteration += 1
        state.train_seconds += time.time() - t0

        metrics = {"reward_mean": float(rewards.nanmean()), "reward_std": float(rewards[~rewards.isnan()].std()),
                   **{f"adv/{k}": v for k, v in adv.stats.items()}, **stats,
                   "lr": lr, "seconds_per_iter": time.time() - t0, "train_minutes": state.train_seconds / 60}
        for tag in sorted({e.get("tag") for e in entries} - {None}):
            rows = torch.tensor([e.get("tag") == tag for e in entries])
            metrics[f"reward/{tag}"] = float(rewards[rows].nanmean())
        accel.log(metrics, step=state.iteration)
        state.history["train"].append({"iteration": state.iteration, **metrics})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", clip=f"{stats.get('clip_frac', 0):.2f}")

        if state.iteration % cfg.eval_every == 0:
            _eval_and_log(policy, eval_entries, cfg, out, state, accel, results, reward_fn)
        if state.iteration % cfg.save_every == 0:
            save_checkpoint(ckpt, policy.transformer, optimizer, state)
    bar.close()

    if state.history["eval"][-1]["iteration"] != state.iteration:
        _eval_and_log(policy, eval_entries, cfg, out, state, accel, results, reward_fn)
    save_checkpoint(ckpt, policy.transformer, optimizer, state)
    with evaluated_weights(policy, state):
        policy.save(out / "final")
    accel.end_training()
    return _finish(state, out)


def evaluated_weights(policy: FlowPolicy, state: TrainState):
    """The weights evaluation and export use: the moving average when the run keeps one, else the live ones."""
    return state.ema.applied(policy.transformer) if state.ema is not None else contextlib.nullcontext()


def _eval_and_log(policy, entries, cfg, out, state, accel, results, reward_fn) -> None:
    name = f"iter{state.iteration:05d}"
    with evaluated_weights(policy, state):
        results[name] = run_eval(policy, entries, cfg, out, name, reward_fn)
    r = results[name]
    state.history["eval"].append({"iteration": state.iteration, **r.summary()})
    if isinstance(r, RewardEvalResult):
        accel.log({"eval/reward": r.mean}, step=state.iteration)
        tqdm.write(f"iteration {state.iteration}: eval reward {r.mean:.4f} ± {r.stderr:.4f} "
                   f"(grid {out / 'eval' / name / 'grid.png'})")
        return
    accel.log({f"eval/{k}": v for k, v in r.accuracy.items()} | {"eval/malformed": r.malformed,
              "eval/background_noise": r.background_noise, "eval/diversity": r.diversity}, step=state.iteration)
    tqdm.write(f"iteration {state.iteration}: overall {100 * r.accuracy['overall']:.1f}% "
               f"(malformed {100 * r.malformed:.1f}%, grid {out / 'eval' / name / 'grid.png'})")


def _finish(state: TrainState, out: Path) -> dict:
    """Print and write base vs trained accuracy (or eval reward) from the evaluation history."""
    base, last = state.history["eval"][0], state.history["eval"][-1]
    summary = {"base": base, "trained": last, "iterations": state.iteration,
               "train_minutes": state.train_seconds / 60, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if "reward" in base:  # eval prompts without GenEval metadata: the training reward
        table = "| model | eval reward |\n|---|---|\n" + "\n".join(
            f"| {name} | {rec['reward']:.4f} ± {rec['reward_stderr']:.4f} |"
            for name, rec in (("base", base), (f"trained ({state.iteration} it)", last)))
        (out / "report.md").write_text(table + "\n")
        print(f"\n{table}\n\ngrids: {out / 'eval'}/*/grid.png   tensorboard --logdir {out}")
        return summary
    models = {"base": base, f"trained ({state.iteration} it)": last}
    table = markdown_table(models)
    (out / "report.md").write_text(report_markdown(models))  # with why images failed, per tag
    print(f"\n{table}\n\noverall accuracy {100 * base['accuracy']['overall']:.1f}% -> "
          f"{100 * last['accuracy']['overall']:.1f}% after {state.train_seconds / 60:.1f} min of training")
    print(f"grids: {out / 'eval'}/*/grid.png   report: {out / 'report.md'}   tensorboard --logdir {out}")
    return summary
