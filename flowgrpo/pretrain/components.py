"""Hand-set frozen components of the Shapes base model: tokenizer, text encoders, VAE.

All three are ordinary diffusers/transformers classes with weights set by hand, so
`StableDiffusion3Pipeline.from_pretrained(path)` loads them like any other checkpoint:

- tokenizer: a CLIPTokenizer whose BPE merges keep every Shapes word whole.
- text encoders: CLIPTextModelWithProjection acting as a bigram bag-of-words encoder. The first
  trial (DESIGN.md) found default-initialised CLIP features nearly prompt-independent (cosine
  0.86-0.95), so the base model ignored prompts. Here layer 1 adds the previous token's embedding
  to each token (position-based attention), which binds "red" to "circle" and "left" to the shape
  before it, and its MLP adds random nonlinear features of each bigram; layer 2 averages causally so
  the pooled EOS vector is a bag of bigram features ("red circle, blue square" != "blue circle, red square").
  LayerNorms are made (near) identity by a huge eps with matching gain, on zero-mean features.
- VAE: an AutoencoderKL (or VQModel) that is an exact identity (one block, no downsampling). GroupNorm+SiLU
  are passed through by pairing each signal channel with its negation and two large constant
  channels in the same group, so the group mean is exactly 0 and the std is data-independent.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 16
STOPWORDS = ("a", "an", "the", "photo", "image", "picture", "of", "and", "with")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LN_EPS = 1e6  # LayerNorm(x) = (x - mean) / sqrt(var + eps) * gain ~= x - mean for |x|^2/D << eps
TOKEN_DIM = 48
POS_SHARPNESS = 20.0  # attention logit gap that makes layer 1 attend to the previous token only
POS_SCALE = 4.0
MLP_DIM = 64  # layer 1's MLP adds nonlinear bigram features so the pooled bag of bigrams is not a bag of words
AVERAGE_GAIN = 8.0  # layer 2's causal average must outweigh the residual (the last word) at EOS


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-character table (same order as CLIP's vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def build_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with merges that build each given word as a single token."""
    base = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in base + [c + "</w>" for c in base]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    # Longer words' merge chains first, so a short word's merge ("r e" of "red") cannot split them.
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # left-to-right merges: prefix + next symbol
            merge = (parts[0], parts[1])
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {word!r} into {ids}; merges are inconsistent")
    return tok


@torch.no_grad()
def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """The frozen bigram bag-of-words CLIP text encoder (see module docstring)."""
    L, T = MAX_TOKENS, TOKEN_DIM
    D = T + L  # token features, then one-hot-ish position features
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=D, intermediate_size=MLP_DIM, projection_dim=T,
        num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=L, hidden_act="quick_gelu",
        layer_norm_eps=LN_EPS, attention_dropout=0.0, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    model = CLIPTextModelWithProjection(cfg).eval()
    for p in model.parameters():
        p.zero_()
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(vocab), T, generator=g)
    emb -= emb.mean(dim=1, keepdim=True)  # zero-mean rows keep the LayerNorms identities
    silent = [vocab[BOS], vocab[EOS]] + [vocab[w + "</w>"] for w in STOPWORDS if w + "</w>" in vocab]
    emb[silent] = 0.0
    tm = model.text_model
    tm.embeddings.token_embedding.weight[:, :T] = emb
    pos = POS_SCALE * (torch.eye(L) - 1.0 / L)  # zero-mean position codes
    tm.embeddings.position_embedding.weight[:, T:] = pos
    gain = float(np.sqrt(LN_EPS))
    for ln in [tm.final_layer_norm] + [m for layer in tm.encoder.layers for m in (layer.layer_norm1, layer.layer_norm2)]:
        ln.weight.fill_(gain)
    eye_tok = torch.zeros(D, D)
    eye_tok[:T, :T] = torch.eye(T)
    bigram, average = tm.encoder.layers
    # Layer 1: query at position i is the position code of i-1, key is the position code of j.
    shift = torch.zeros(D, D)
    for i in range(1, L):
        shift[T + i - 1, T + i] = POS_SHARPNESS / POS_SCALE**2 * D**0.5
    bigram.self_attn.q_proj.weight.copy_(shift)
    bigram.self_attn.k_proj.weight[T:, T:] = torch.eye(L)
    for layer, gain in ((bigram, 1.0), (average, AVERAGE_GAIN)):  # token features only; q=k=0 in layer 2
        layer.self_attn.v_proj.weight.copy_(eye_tok)
        layer.self_attn.out_proj.weight.copy_(gain * eye_tok)
    fc2 = torch.randn(T, MLP_DIM, generator=g) * (3.0 / MLP_DIM**0.5)
    bigram.mlp.fc1.weight[:, :T] = torch.randn(MLP_DIM, T, generator=g) / T**0.5
    bigram.mlp.fc2.weight[:T] = fc2 - fc2.mean(dim=0, keepdim=True)  # zero-mean outputs
    q, _ = torch.linalg.qr(torch.randn(T, T, generator=g))
    model.text_projection.weight[:, :T] = q
    return model


@torch.no_grad()
def build_identity_vae(scaling_factor: float, latent_channels: int = 3, big: float = 1000.0, lift: float = 20.0) -> AutoencoderKL:
    """An AutoencoderKL whose encode (mode) and decode are both the identity (see module docstring)."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4 * latent_channels,), layers_per_block=1, norm_num_groups=latent_channels,
        mid_block_add_attention=False, scaling_factor=scaling_factor, shift_factor=0.0,
    ).eval()
    make_identity(vae, latent_channels, big, lift)
    vae.encoder.conv_out.bias[latent_channels:] = -30.0  # log-variance: std ~ 3e-7
    return vae


@torch.no_grad()
def make_identity(model, latent_channels: int, big: float = 1000.0, lift: float = 20.0) -> None:
    """Set a one-block diffusers autoencoder (AutoencoderKL or VQModel, block width 4 x latent_channels, one GroupNorm
    group per latent channel) to encode and decode as the identity (see module docstring)."""
    for p in model.parameters():
        p.zero_()
    std = (big**2 / 2) ** 0.5  # GroupNorm std of a group: sqrt((big^2 + E[x^2]) / 2) ~= big / sqrt(2)

    def lift_in(conv: torch.nn.Conv2d) -> None:  # n input channels -> groups [x, -x, big, -big]
        for k in range(conv.in_channels):
            conv.weight[4 * k, k, 1, 1] = 1.0
            conv.weight[4 * k + 1, k, 1, 1] = -1.0
            conv.bias[4 * k + 2] = big
            conv.bias[4 * k + 3] = -big

    def pass_norm(norm: torch.nn.GroupNorm) -> None:  # restore scale, shift into SiLU's linear range
        norm.weight[0::4] = std
        norm.weight[1::4] = std
        norm.bias[0::4] = lift
        norm.bias[1::4] = lift

    def lower_out(conv: torch.nn.Conv2d, n: int) -> None:  # (x + lift) - (-x + lift) = 2x
        for k in range(n):
            conv.weight[k, 4 * k, 1, 1] = 0.5
            conv.weight[k, 4 * k + 1, 1, 1] = -0.5

    enc, dec = model.encoder, model.decoder
    lift_in(enc.conv_in)
    pass_norm(enc.conv_norm_out)
    lower_out(enc.conv_out, latent_channels)
    lift_in(dec.conv_in)
    pass_norm(dec.conv_norm_out)
    lower_out(dec.conv_out, 3)
    for conv in (model.quant_conv, model.post_quant_conv):
        conv.weight.copy_(torch.eye(conv.in_channels)[:, :, None, None])
    # Every ResNet block becomes the identity: its residual branch ends in a zero conv.
