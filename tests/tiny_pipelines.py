"""Tiny random SD3, FLUX and Sana pipelines built from config (no downloads), saved as a user's local directory.

Each builder returns the path of a `save_pretrained` directory that `FlowPolicy.from_pretrained(path)` and
`DiffusionPipeline.from_pretrained(path)` load offline. Sizes are the smallest the architectures accept, so a
whole training iteration runs in well under a second on a CPU; the images are 32x32.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, Gemma2Config, Gemma2Model, GemmaTokenizer, T5Config, \
    T5EncoderModel, T5Tokenizer

from flowgrpo.pretrain.components import build_tokenizer
from flowgrpo.pretrain.model import TransformerSpec, build_pipeline

IMAGE_SIZE = 32
WORDS = "a photo of red green blue circle square triangle cat dog on the left right".split()
_CHARS = string.ascii_letters + string.digits + string.punctuation


def _t5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer over whole words and single characters (unknown words split into characters)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -5.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _gemma_tokenizer() -> GemmaTokenizer:
    """A character-level BPE tokenizer with Gemma's special tokens (no merges)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *_CHARS])}
    return GemmaTokenizer(vocab=vocab, merges=[])


def _save(pipe, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_sd3(tmp_path: Path) -> Path:
    """The Shapes SD3 pipeline with a one-layer random transformer."""
    pipe = build_pipeline(TransformerSpec(num_layers=1, attention_head_dim=8, num_attention_heads=2), seed=0)
    return _save(pipe, Path(tmp_path) / "tiny-sd3")


def tiny_flux(tmp_path: Path, *, guidance_embeds: bool = True) -> Path:
    """FluxPipeline: 2x-downsampling VAE with FLUX's scale/shift, CLIP (pooled) + T5, guidance-distilled transformer."""
    torch.manual_seed(0)
    clip_tok = build_tokenizer(WORDS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=clip_tok.model_max_length,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.eos_token_id))
    t5_tok = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok.get_vocab()), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    # in_channels = 4 latent channels x a 2x2 patch; rope axes (2, 2, 4) sum to the head dim 8.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    return _save(pipe, Path(tmp_path) / "tiny-flux")


def tiny_sana(tmp_path: Path) -> Path:
    """SanaPipeline: 4x-downsampling DC-AE, one-layer Gemma2 text encoder, one-layer linear-attention transformer."""
    torch.manual_seed(0)
    tok = _gemma_tokenizer()
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                     pad_token_id=tok.pad_token_id))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4,
                        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=IMAGE_SIZE // 4, patch_size=1)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                            solver_order=2)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer, scheduler=scheduler)
    return _save(pipe, Path(tmp_path) / "tiny-sana")
