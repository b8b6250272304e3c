"""Assemble the Shapes masked-diffusion model as a diffusers AmusedPipeline (aMUSEd's VQModel + UVit2DModel).

Tokens are pixels: a Shapes image is drawn in a five-colour palette (the grey background and four object colours),
so the VQModel is an exact palette quantiser — an identity encoder and decoder (`make_identity`) around a codebook
whose five entries are the palette colours in [0, 1]. A rendered image encodes to its palette indices and decodes
back to itself, pixel for pixel; the generative model sees 32 x 32 tokens of a five-word vocabulary (plus the mask
token) and its UVit2D downsamples them once, so its transformer runs on 16 x 16 positions. Tokenizer and text
encoder are the flow model's hand-set frozen ones (a bigram CLIP encoder); `AmusedPipeline.from_pretrained(path)`
loads the result like any aMUSEd checkpoint, and a real aMUSEd checkpoint loads into the same policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

from flowgrpo.pretrain.components import MAX_TOKENS, TOKEN_DIM, build_text_encoder, build_tokenizer, make_identity
from flowgrpo.pretrain.model import shapes_vocabulary
from flowgrpo.shapes import world as W

PALETTE = np.array([W.BACKGROUND, *W.COLORS.values()], dtype=np.uint8)  # token i = colour PALETTE[i]
MASK_ID = len(PALETTE)
MICRO_COND_DIM = 8  # sinusoidal width of each of aMUSEd's five micro-conditions (size, crop, aesthetic score)


@dataclass(frozen=True)
class MDMSpec:
    hidden_size: int = 64
    num_layers: int = 4
    heads: int = 4
    block_channels: int = 32  # width at the 32 x 32 token grid and the first downsampled stage
    embed_channels: int = 16


@torch.no_grad()
def build_palette_vq() -> VQModel:
    """The exact palette VQModel (module doc): encode + quantise gives palette indices, decode gives the colours."""
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(12,), layers_per_block=1, latent_channels=3,
                 sample_size=W.IMAGE_SIZE, num_vq_embeddings=len(PALETTE), norm_num_groups=3, vq_embed_dim=3,
                 scaling_factor=1.0, mid_block_add_attention=False, lookup_from_codebook=True).eval()
    make_identity(vq, latent_channels=3)
    vq.quantize.embedding.weight.copy_(torch.from_numpy(PALETTE).float() / 255)
    return vq


def build_uvit(spec: MDMSpec, seed: int) -> UVit2DModel:
    torch.manual_seed(seed)  # diffusers initialises modules from the global generator
    return UVit2DModel(
        hidden_size=spec.hidden_size, use_bias=False, cond_embed_dim=TOKEN_DIM, micro_cond_encode_dim=MICRO_COND_DIM,
        micro_cond_embed_dim=5 * MICRO_COND_DIM, encoder_hidden_size=TOKEN_DIM + MAX_TOKENS,
        vocab_size=MASK_ID + 1, codebook_size=len(PALETTE), in_channels=spec.embed_channels,
        block_out_channels=spec.block_channels, num_res_blocks=1, downsample=True, upsample=True,
        block_num_heads=2, num_hidden_layers=spec.num_layers, num_attention_heads=spec.heads,
        intermediate_size=2 * spec.hidden_size, sample_size=W.IMAGE_SIZE,
    )


def build_mdm_pipeline(spec: MDMSpec = MDMSpec(), seed: int = 0) -> AmusedPipeline:
    """A fresh (untrained transformer) Shapes MDM; tokenizer, text encoder and VQModel are final and frozen."""
    tokenizer = build_tokenizer(shapes_vocabulary())
    return AmusedPipeline(vqvae=build_palette_vq(), tokenizer=tokenizer,
                          text_encoder=build_text_encoder(tokenizer, seed=seed + 1),
                          transformer=build_uvit(spec, seed), scheduler=AmusedScheduler(mask_token_id=MASK_ID))


def palette_tokens(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] Shapes images -> palette indices [B, H, W] (nearest palette colour; exact for renders)."""
    d = ((images[..., None, :].astype(np.int32) - PALETTE.astype(np.int32)) ** 2).sum(-1)
    return torch.from_numpy(d.argmin(-1)).long()
