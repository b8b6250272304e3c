"""The Shapes base model's hand-set components and the pipeline round trip (offline)."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowgrpo.pretrain.components import build_identity_vae, build_text_encoder, build_tokenizer
from flowgrpo.pretrain.model import TransformerSpec, build_pipeline, encode_prompts, shapes_vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(shapes_vocabulary())


def test_tokenizer_keeps_words_whole(tokenizer):
    ids = tokenizer("a photo of a red circle left of three triangles").input_ids
    assert len(ids) == 2 + 10  # BOS, ten words, EOS
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a red circle left of three triangles"
    assert len(tokenizer("an octagon").input_ids) > 4  # unknown words fall back to characters, no crash


def test_text_encoder_binds_attributes(tokenizer):
    te = build_text_encoder(tokenizer, seed=1)
    prompts = ["a photo of a red circle and a blue square", "a photo of a blue circle and a red square",
               "a photo of a red circle", "a photo of a blue square"]
    ids = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    pooled = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    cos = pooled @ pooled.T
    assert cos[0, 1] < 0.99  # swapped colours are different prompts (a bag of words would give 1.0)
    assert cos[2, 3] < 0.2  # disjoint prompts are far apart
    seq = out.hidden_states[-2]
    circle_pos = 6  # BOS a photo of a red [circle]
    assert torch.linalg.vector_norm(seq[0, circle_pos] - seq[1, circle_pos]) > 1.0  # "circle" carries its colour
    assert torch.equal(seq[0, 1:5], seq[1, 1:5])  # causal: identical prefixes give identical features


def test_identity_vae_round_trip(tmp_path):
    vae = build_identity_vae(2.0)
    vae.save_pretrained(tmp_path)
    vae = type(vae).from_pretrained(tmp_path)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    assert (z - x).abs().max() < 1e-5 and (y - x).abs().max() < 1e-5


def test_pipeline_saves_and_reloads_offline(tmp_path):
    pipe = build_pipeline(TransformerSpec(num_layers=1, attention_head_dim=8, num_attention_heads=2), seed=0)
    e0, p0 = encode_prompts(pipe, ["a photo of two squares"])
    pipe.save_pretrained(tmp_path)
    again = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    e1, p1 = encode_prompts(again, ["a photo of two squares"])
    # Reloading may pick another attention kernel: equal up to float32 rounding.
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-5)
    images = again("a photo of two squares", num_inference_steps=2, guidance_scale=1.0, max_sequence_length=1,
                   output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
