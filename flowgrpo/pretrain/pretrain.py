"""Pretrain the Shapes base model: flow matching on rendered images, frozen text encoders and VAE (the masked
diffusion model: `flowgrpo.pretrain.mdm_pretrain`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from flowgrpo.media import to_uint8
from flowgrpo.policies.flow import MODEL_OPTIONS_FILE
from flowgrpo.pretrain.data import render_batch
from flowgrpo.pretrain.model import LATENT_SCALE, MAX_SEQUENCE_LENGTH, TransformerSpec, build_pipeline, encode_prompts
from flowgrpo.pretrain.pretrain_config import PretrainConfig
from flowgrpo.pretrain.pretrain_loop import STATE_FILE, PretrainRun, load_state, mini_eval_entries, score
from flowgrpo.pretrain.sampling import conditioning_probe, ode_sample
from flowgrpo.prompts.loaders import tag_balanced_indices
from flowgrpo.prompts.shapes import load_split
from flowgrpo.samplers.schedules import flow_sigmas
from flowgrpo.shapes import world as W

__all__ = ["STATE_FILE", "PretrainConfig", "pretrain", "quick_eval"]


@torch.no_grad()
def quick_eval(transformer, cache, neg, test: list[dict], steps: int, guidance: float, per_tag: int,
               seed: int = 0) -> dict:
    """Accuracy on the first `per_tag` test entries of every tag, one image each."""
    picked = mini_eval_entries(test, per_tag)
    embeds = torch.cat([cache[e["prompt"]][0] for e in picked])
    pooled = torch.cat([cache[e["prompt"]][1] for e in picked])
    sig = flow_sigmas({"num_train_timesteps": 1000, "shift": 1.0}, steps)
    lat = ode_sample(transformer, embeds, pooled, *neg, sigmas=sig, cfg=guidance,
                     generator=torch.Generator().manual_seed(seed), latent_shape=(3, W.IMAGE_SIZE, W.IMAGE_SIZE))
    return score(picked, to_uint8((lat / LATENT_SCALE + 1) / 2))  # latents are pixels in [-1, 1] (identity VAE)


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


def pretrain(cfg: PretrainConfig) -> Path:
    cfg = cfg.resolved()
    if cfg.kind == "mdm":
        from flowgrpo.pretrain.mdm_pretrain import pretrain_mdm

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
    run = PretrainRun(pipe.transformer, cfg, out, state)
    model, ema, rng, gen = run.model, run.ema, run.rng, run.gen

    probe_rng = np.random.default_rng(10_000 + cfg.seed)
    probe_idx = tag_balanced_indices(train, 256, probe_rng)
    probe_lat = render_batch(train, probe_idx, probe_rng) * LATENT_SCALE
    probe_e = torch.cat([cache[train[i]["prompt"]][0] for i in probe_idx])
    probe_p = torch.cat([cache[train[i]["prompt"]][1] for i in probe_idx])

    def next_loss() -> torch.Tensor:
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
        return (v - (noise - x0)).pow(2).mean()

    def measure() -> dict:
        record = {f"probe_t{t}": conditioning_probe(ema, probe_lat, probe_e, probe_p, t=t) for t in (0.5, 0.9)}
        record["eval"] = quick_eval(ema, cache, neg, test, cfg.eval_steps, cfg.eval_cfg, cfg.eval_per_tag)
        return record

    def save_checkpoint(ckpt: Path) -> None:
        pipe.transformer = ema
        pipe.save_pretrained(ckpt, safe_serialization=True)
        pipe.transformer = model
        (ckpt / MODEL_OPTIONS_FILE).write_text(json.dumps({"family_options": {"max_sequence_length": MAX_SEQUENCE_LENGTH}}))

    return run.train("pretrain", next_loss, measure, save_checkpoint)
