"""Pretrain the Shapes masked diffusion model: MaskGIT / aMUSEd masked-token prediction on rendered images.

Each step renders a tag-balanced batch, tokenises it exactly (palette indices), masks every token with probability
cos(pi/2 u), u ~ U(0, 1) (at least one per image), drops 10% of the prompts for classifier-free guidance, and
minimises the cross-entropy of the masked tokens. Checkpoints hold the EMA weights and the hand-set schedule
(`SchedulePolicy.default` of ``eval_steps`` steps at CFG ``eval_cfg``, sampling temperature
``eval_temperature``, remasking temperature ``eval_remask`` falling to 0), and a resumed run continues exactly.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.policies.schedule import SchedulePolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.rewards.shapes import to_uint8
from flowgrpo.shapes import world as W
from flowgrpo.shapes.data import tag_balanced_indices
from flowgrpo.shapes.mdm_model import MASK_ID, MDMSpec, build_mdm_pipeline, palette_tokens
from flowgrpo.shapes.pretrain import STATE_FILE, load_state, lr_at
from flowgrpo.shapes.pretrain_config import PretrainConfig
from flowgrpo.shapes.render import render
from flowgrpo.shapes.sampling import summarize
from flowgrpo.shapes.verify import verify


def spec_of(cfg: PretrainConfig) -> MDMSpec:
    width = cfg.heads * cfg.head_dim
    return MDMSpec(hidden_size=width, num_layers=cfg.num_layers, heads=cfg.heads, block_channels=width // 2,
                   embed_channels=width // 4)


def initial_pipeline(cfg: PretrainConfig, spec: MDMSpec):
    """A fresh pipeline, or with `init` the saved one (checked against the options)."""
    if not cfg.init:
        return build_mdm_pipeline(spec, seed=cfg.seed)
    from diffusers import AmusedPipeline

    if not (Path(cfg.init) / "transformer").is_dir():
        raise ValueError(f"--init {cfg.init}: not a Shapes pipeline directory (no transformer/ inside)")
    pipe = AmusedPipeline.from_pretrained(cfg.init)
    have = pipe.transformer.config
    found = MDMSpec(have.hidden_size, have.num_hidden_layers, have.num_attention_heads, have.block_out_channels,
                    have.in_channels)
    if found != spec:
        raise ValueError(f"--init {cfg.init} has transformer {found}, but the options ask for {spec}")
    return pipe


def mask_tokens(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, N] bool: each token masked with probability cos(pi/2 u) of its image's u ~ U(0, 1), at least one."""
    u = torch.rand(x0.shape[0], 1, generator=generator)
    mask = torch.rand(x0.shape, generator=generator) < torch.cos(math.pi / 2 * u)
    first = torch.randint(x0.shape[1], (x0.shape[0],), generator=generator)
    mask[torch.arange(x0.shape[0]), first] = True
    return mask


@torch.no_grad()
def quick_eval(policy: MaskedDiffusionPolicy, test: list[dict], per_tag: int, seed: int = 0) -> dict:
    """Accuracy on the first `per_tag` test entries of every tag, one image each, under the policy's schedule."""
    picked = [e for tag in W.TAGS for e in [x for x in test if x["tag"] == tag][:per_tag]]
    images = to_uint8(policy.generate([e["prompt"] for e in picked], generator=torch.Generator().manual_seed(seed)))
    passed, malformed, empty = defaultdict(list), 0, 0
    for e, img in zip(picked, images):
        v = verify(img, e)
        passed[e["tag"]].append(v.passed)
        malformed += v.malformed > 0
        empty += len(v.detections) == 0
    out = summarize(passed)
    out.update(malformed=malformed / len(picked), empty=empty / len(picked))
    return out


def pretrain_mdm(cfg: PretrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    state = load_state(out, cfg)
    pipe = initial_pipeline(cfg, spec_of(cfg))
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_split("train"), load_split("test")
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    pipe.transformer = ema  # what evaluations sample from and checkpoints hold
    schedule = SchedulePolicy.default(cfg.eval_steps, cfg.eval_cfg, temperature=cfg.eval_temperature,
                                      remask=cfg.eval_remask)
    policy = MaskedDiffusionPolicy(pipe, schedule, micro_batch=64, mode="schedule")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    first, minutes_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        first, minutes_before = state["step"], state["minutes"]

    def save_state(step: int, minutes: float) -> None:
        tmp = out / (STATE_FILE + ".tmp")  # written whole, then renamed: a stop mid-write keeps the old state
        torch.save({"step": step, "minutes": minutes, "model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(),
                    "config": asdict(cfg)}, tmp)
        tmp.replace(out / STATE_FILE)

    log = open(out / "log.jsonl", "a")
    start = time.time()
    bar = tqdm(range(first, cfg.steps), desc="pretrain mdm", mininterval=5, initial=first, total=cfg.steps)
    for step in bar:
        idx = tag_balanced_indices(train, cfg.batch_size, rng)
        x0 = palette_tokens(np.stack([render(train[i], rng) for i in idx])).flatten(1)
        prompts = [train[i]["prompt"] for i in idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        pooled, hidden, micro = policy.cond(["" if d else p for p, d in zip(prompts, drop.tolist())])
        mask = mask_tokens(x0, gen)
        x_in = torch.where(mask, MASK_ID, x0).view(-1, *policy.grid)
        logits = model(x_in, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
        loss = torch.nn.functional.cross_entropy(logits.flatten(2).transpose(1, 2)[mask], x0[mask])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = (time.time() - start) / 60
        minutes = minutes_before + elapsed
        out_of_time = cfg.max_minutes and elapsed >= cfg.max_minutes  # this invocation's budget
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "minutes": minutes, "loss": loss.item(),
                      "eval": quick_eval(policy, test, cfg.eval_per_tag)}
            print(json.dumps(record), file=log, flush=True)
            tqdm.write(json.dumps(record))
            ckpt = policy.save(out / f"step{step + 1:06d}")
            (ckpt / "flowgrpo_pretrain.json").write_text(json.dumps({"config": asdict(cfg), "record": record}, indent=1))
            save_state(step + 1, minutes)
        elif out_of_time:
            save_state(step + 1, minutes)
        if out_of_time and step + 1 < cfg.steps:
            tqdm.write(f"stopped at step {step + 1} after {cfg.max_minutes:g} minutes; continue with --resume")
            break
    return out
