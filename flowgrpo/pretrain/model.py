"""Assemble the Shapes base model as a diffusers StableDiffusion3Pipeline (T5 slot empty)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from flowgrpo.pretrain.components import TOKEN_DIM, MAX_TOKENS, build_identity_vae, build_text_encoder, build_tokenizer
from flowgrpo.prompts.shapes import all_prompts
from flowgrpo.shapes import world as W

# The SD3 pipeline appends this many zero "T5" tokens when text_encoder_3 is None; train and sample with it.
MAX_SEQUENCE_LENGTH = 1
LATENT_SCALE = 2.0  # Shapes images in [-1, 1] have per-pixel std ~0.5: scale latents to unit variance


@dataclass(frozen=True)
class TransformerSpec:
    patch_size: int = 4
    num_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4


def shapes_vocabulary() -> list[str]:
    return sorted({w for p in all_prompts() for w in p["prompt"].split()})


def build_transformer(spec: TransformerSpec, seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)  # diffusers initialises modules from the global generator
    width = spec.attention_head_dim * spec.num_attention_heads
    return SD3Transformer2DModel(
        sample_size=W.IMAGE_SIZE, patch_size=spec.patch_size, in_channels=3, out_channels=3,
        num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=2 * (TOKEN_DIM + MAX_TOKENS),
        caption_projection_dim=width, pooled_projection_dim=2 * TOKEN_DIM,
        pos_embed_max_size=W.IMAGE_SIZE // spec.patch_size,
    )


def build_pipeline(spec: TransformerSpec = TransformerSpec(), seed: int = 0) -> StableDiffusion3Pipeline:
    """A fresh (untrained transformer) Shapes pipeline; text encoders and VAE are final and frozen."""
    tokenizer = build_tokenizer(shapes_vocabulary())
    return StableDiffusion3Pipeline(
        transformer=build_transformer(spec, seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=build_identity_vae(LATENT_SCALE),
        text_encoder=build_text_encoder(tokenizer, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer, seed=seed + 2),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, S, J], pooled [B, P]) exactly as the pipeline computes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=prompts, prompt_3=prompts, do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"),
    )
    return embeds, pooled
