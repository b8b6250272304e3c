"""Pretrain the Shapes base model: flow matching on rendered images, frozen text encoders and VAE (the masked
diffusion model: `flowgrpo.shapes.mdm_pretrain`)."""
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
from diffusers import StableDiffusion3Pipeline
from tqdm import tqdm

from flowgrpo.policies.flow import MODEL_OPTIONS_FILE
from flowgrpo.prompts.shapes import load_split
from flowgrpo.samplers.schedules import flow_sigmas
from flowgrpo.shapes import world as W
from flowgrpo.rewards.shapes import to_uint8
from flowgrpo.shapes.data import render_batch, tag_balanced_indices
from flowgrpo.shapes.pretrain_config import RUN_CONTROL, PretrainConfig
from flowgrpo.shapes.model import LATENT_SCALE, MAX_SEQUENCE_LENGTH, TransformerSpec, build_pipeline, encode_prompts
from flowgrpo.shapes.sampling import conditioning_probe, ode_sample, summarize
from flowgrpo.shapes.verify import verify

STATE_FILE = "state.pt"


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def quick_eval(transformer, cache, neg, test: list[dict], cfg: PretrainConfig, steps: int, guidance: float,
               per_tag: int, seed: int = 0) -> dict:
    """Accuracy on the first `per_tag` test entries of every tag, one image each."""
    picked = [e for tag in W.TAGS for e in [x for x in test if x["tag"] == tag][:per_tag]]
    embeds = torch.cat([cache[e["prompt"]][0] for e in picked])
    pooled = torch.cat([cache[e["prompt"]][1] for e in picked])
    sig = flow_sigmas({"num_train_timesteps": 1000, "shift": 1.0}, steps)
    lat = ode_sample(transformer, embeds, pooled, *neg, sigmas=sig, cfg=guidance,
                     generator=torch.Generator().manual_seed(seed), latent_shape=(3, W.IMAGE_SIZE, W.IMAGE_SIZE))
    images = to_uint8((lat / LATENT_SCALE + 1) / 2)  # latents are pixels in [-1, 1] (identity VAE)
    passed, malformed, empty = defaultdict(list), 0, 0
    for e, img in zip(picked, images):
        v = verify(img, e)
        passed[e["tag"]].append(v.passed)
        malformed += v.malformed > 0
        empty += len(v.detections) == 0
    out = summarize(passed)
    out.update(malformed=malformed / len(picked), empty=empty / len(picked))
    return out


def initial_pipeline(cfg: PretrainConfig, spec: TransformerSpec) -> StableDiffusion3Pipeline:
    """A fresh pipeline, or with `init` the saved one (its frozen text encoders and VAE come along)."""
    if not cfg.init:
        return build_pipeline(spec, seed=cfg.seed)
    if not (Path(cfg.init) / "transformer").is_dir():
        raise ValueError(f"--init {cfg.init}: not a Shapes pipeline directory (no transformer/ inside)")
    pipe = StableDiffusion3Pipeline.from_pretrained(cfg.init, text_encoder_3=None, tokenizer_3=None)
    have = pipe.transformer.config
    found = TransformerSpec(have.patch_size, have.num_layers, have.attention_head_dim, have.num_attention_heads)
    if found != spec:
        raise ValueError(f"--init {cfg.init} has transformer {found}, but the options ask for {spec}")
    return pipe


def load_state(out: Path, cfg: PretrainConfig) -> dict | None:
    """The saved state to resume from (None for a new run); refuses to overwrite a run or to resume a different one."""
    path = out / STATE_FILE
    if not cfg.resume:
        if path.exists():
            raise ValueError(f"{out} already holds a pretraining run; pass --resume to continue it or choose another --out")
        return None
    if not path.exists():
        raise ValueError(f"--resume: no {STATE_FILE} in {out} to continue from")
    try:
        state = torch.load(path, weights_only=True)
        saved = state["config"]
    except Exception as e:  # truncated or foreign file: say which, keep it for inspection
        raise ValueError(f"--resume: cannot read {path} as a pretraining state ({e})") from e
    now = asdict(cfg)
    changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in saved.items() if k not in RUN_CONTROL and now.get(k) != v]
    if changed:
        raise ValueError(f"--resume must keep the run's options; changed: {', '.join(changed)}")
    return state


def pretrain(cfg: PretrainConfig) -> Path:
    cfg = cfg.resolved()
    if cfg.kind == "mdm":
        from flowgrpo.shapes.mdm_pretrain import pretrain_mdm

        return pretrain_mdm(cfg)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    spec = TransformerSpec(cfg.patch_size, cfg.num_layers, cfg.head_dim, cfg.heads)
    state = load_state(out, cfg)
    pipe = initial_pipeline(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_split("train"), load_split("test")
    prompts = sorted({e["prompt"] for e in train + test} | {""})
    e_all, p_all = encode_prompts(pipe, prompts)
    cache = {p: (e_all[i : i + 1], p_all[i : i + 1]) for i, p in enumerate(prompts)}
    neg = cache[""]
    train_embeds = torch.cat([cache[e["prompt"]][0] for e in train])
    train_pooled = torch.cat([cache[e["prompt"]][1] for e in train])

    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
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

    probe_rng = np.random.default_rng(10_000 + cfg.seed)
    probe_idx = tag_balanced_indices(train, 256, probe_rng)
    probe_lat = render_batch(train, probe_idx, probe_rng) * LATENT_SCALE
    log = open(out / "log.jsonl", "a")
    start = time.time()
    bar = tqdm(range(first, cfg.steps), desc="pretrain", mininterval=5, initial=first, total=cfg.steps)
    for step in bar:
        idx = tag_balanced_indices(train, cfg.batch_size, rng)
        x0 = render_batch(train, idx, rng) * LATENT_SCALE
        embeds, pooled = train_embeds[idx].clone(), train_pooled[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        embeds[drop], pooled[drop] = neg[0], neg[1]
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))  # logit-normal: crisper shapes
        noise = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        v = model(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                  timestep=t * 1000.0, return_dict=False)[0]
        loss = (v - (noise - x0)).pow(2).mean()
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
            probe_e = torch.cat([cache[train[i]["prompt"]][0] for i in probe_idx])
            probe_p = torch.cat([cache[train[i]["prompt"]][1] for i in probe_idx])
            record = {"step": step + 1, "minutes": minutes, "loss": loss.item()}
            for t_probe in (0.5, 0.9):
                record[f"probe_t{t_probe}"] = conditioning_probe(ema, probe_lat, probe_e, probe_p, t=t_probe)
            record["eval"] = quick_eval(ema, cache, neg, test, cfg, cfg.eval_steps, cfg.eval_cfg, cfg.eval_per_tag)
            print(json.dumps(record), file=log, flush=True)
            tqdm.write(json.dumps(record))
            ckpt = out / f"step{step + 1:06d}"
            pipe.transformer = ema
            pipe.save_pretrained(ckpt, safe_serialization=True)
            pipe.transformer = model
            (ckpt / MODEL_OPTIONS_FILE).write_text(json.dumps({"family_options": {"max_sequence_length": MAX_SEQUENCE_LENGTH}}))
            (ckpt / "flowgrpo_pretrain.json").write_text(json.dumps({"config": asdict(cfg), "record": record}, indent=1))
            save_state(step + 1, minutes)
        elif out_of_time:
            save_state(step + 1, minutes)
        if out_of_time and step + 1 < cfg.steps:
            tqdm.write(f"stopped at step {step + 1} after {cfg.max_minutes:g} minutes; continue with --resume")
            break
    return out
