"""Pretrain the Shapes masked diffusion model: MaskGIT / aMUSEd masked-token prediction on rendered images.

Each step renders a tag-balanced batch, tokenises it exactly (palette indices), masks every token with probability
cos(pi/2 u), u ~ U(0, 1) (at least one per image), drops 10% of the prompts for classifier-free guidance, and
minimises the cross-entropy of the masked tokens. Checkpoints hold the EMA weights and the hand-set schedule
(`SchedulePolicy.default` of ``eval_steps`` steps at CFG ``eval_cfg``, sampling temperature
``eval_temperature``, remasking temperature ``eval_remask`` falling to 0), and a resumed run continues exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from flowgrpo.media import to_uint8
from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.policies.schedule import SchedulePolicy
from flowgrpo.pretrain.mdm_model import MASK_ID, MDMSpec, build_mdm_pipeline, palette_tokens
from flowgrpo.pretrain.pretrain_config import PretrainConfig
from flowgrpo.pretrain.pretrain_loop import PretrainRun, load_state, mini_eval_entries, score
from flowgrpo.prompts.loaders import tag_balanced_indices
from flowgrpo.prompts.shapes import load_split
from flowgrpo.shapes.render import render


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
    picked = mini_eval_entries(test, per_tag)
    return score(picked, to_uint8(policy.generate([e["prompt"] for e in picked],
                                                 generator=torch.Generator().manual_seed(seed))))


def pretrain_mdm(cfg: PretrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    state = load_state(out, cfg)
    pipe = initial_pipeline(cfg, spec_of(cfg))
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_split("train"), load_split("test")
    run = PretrainRun(pipe.transformer, cfg, out, state)
    model, rng, gen = run.model, run.rng, run.gen
    pipe.transformer = run.ema  # what evaluations sample from and checkpoints hold
    schedule = SchedulePolicy.default(cfg.eval_steps, cfg.eval_cfg, temperature=cfg.eval_temperature,
                                      remask=cfg.eval_remask)
    policy = MaskedDiffusionPolicy(pipe, schedule, micro_batch=64, mode="schedule")

    def next_loss() -> torch.Tensor:
        idx = tag_balanced_indices(train, cfg.batch_size, rng)
        x0 = palette_tokens(np.stack([render(train[i], rng) for i in idx])).flatten(1)
        prompts = [train[i]["prompt"] for i in idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        pooled, hidden, micro = policy.cond(["" if d else p for p, d in zip(prompts, drop.tolist())])
        mask = mask_tokens(x0, gen)
        x_in = torch.where(mask, MASK_ID, x0).view(-1, *policy.grid)
        logits = model(x_in, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
        return torch.nn.functional.cross_entropy(logits.flatten(2).transpose(1, 2)[mask], x0[mask])

    return run.train("pretrain mdm", next_loss, lambda: {"eval": quick_eval(policy, test, cfg.eval_per_tag)},
                     lambda ckpt: policy.save(ckpt))
