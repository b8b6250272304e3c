"""CLIP-based rewards on tiny random checkpoints saved to disk and reloaded through the rewards' own loaders."""
import gzip
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from flowgrpo.rewards import build_reward

PROMPTS = ["a red circle", "two blue squares on the left", "a photo of a cat", "green text"]


def quantised_images(n, h, w, seed):
    """Images whose values are multiples of 1/255, so a PNG/PIL round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def smooth_images(n, h, w):
    """Low-frequency images: any decent resampler gives nearly the same downscaled pixels."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    return torch.stack([torch.stack([(0.5 + 0.4 * torch.sin(3 * x + k + c) * torch.cos(2 * y - c)).expand(h, w)
                                     for c in range(3)]) for k in range(n)])


def to_pil(image):
    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


# ---------------------------------------------------------------- open_clip (clipscore)

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory):
    """(config json, checkpoint file, the in-memory model the checkpoint was saved from)."""
    root = tmp_path_factory.mktemp("open_clip")
    cfg_file = root / "flowgrpo-test-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_file)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model("flowgrpo-test-tiny-clip").eval()
    ckpt = root / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg_file, ckpt, model


def direct_clipscore(model, images, prompts):
    """Reference: open_clip's own PIL preprocessing and tokenizer, cosine clamped at 0."""
    _, _, preprocess = open_clip.create_model_and_transforms("flowgrpo-test-tiny-clip")
    pixels = torch.stack([preprocess(to_pil(img)) for img in images])
    tokens = open_clip.get_tokenizer("flowgrpo-test-tiny-clip")(prompts)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    return (img * txt).sum(-1)


def test_clipscore_matches_direct_open_clip(open_clip_ckpt):
    cfg_file, ckpt, model = open_clip_ckpt
    reward = build_reward("clipscore", checkpoint=str(ckpt), model_config=str(cfg_file), scale=100.0)
    images = quantised_images(4, 32, 32, seed=1)
    cos = direct_clipscore(model, images, PROMPTS)
    out = reward(images, PROMPTS, None)
    assert torch.allclose(out, 100 * cos.clamp(min=0), atol=1e-4)
    assert reward.stats["samples"] == 4 and reward.stats["nan"] == 0
    # Different prompts give different scores and negatives really are clamped (random model, fixed seed).
    assert (cos < 0).any() and (cos > 0).any(), cos
    assert (out == 0).sum() == (cos < 0).sum()


def test_clipscore_resizes_non_square_images_like_open_clip(open_clip_ckpt):
    cfg_file, ckpt, model = open_clip_ckpt
    reward = build_reward("clipscore", checkpoint=str(ckpt), arch="flowgrpo-test-tiny-clip")
    images = smooth_images(2, 48, 64)  # shortest side 48 -> 32, then centre crop 32x32
    out = reward(images, PROMPTS[:2], None)
    assert torch.allclose(out, direct_clipscore(model, images, PROMPTS[:2]).clamp(min=0), atol=5e-3)


def test_clipscore_local_path_errors(open_clip_ckpt, tmp_path):
    cfg_file, ckpt, _ = open_clip_ckpt
    with pytest.raises(FileNotFoundError, match=r"checkpoint='.*missing\.pt' is not an existing local file"):
        build_reward("clipscore", checkpoint=str(tmp_path / "missing.pt"), arch="ViT-B-32")
    with pytest.raises(ValueError, match="option 'checkpoint' is required"):
        build_reward("clipscore", checkpoint="", arch="ViT-B-32")
    with pytest.raises(FileNotFoundError, match="model_config="):
        build_reward("clipscore", checkpoint=str(ckpt), model_config=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="option 'arch' is required"):
        build_reward("clipscore", checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="not a registered open_clip architecture"):
        build_reward("clipscore", checkpoint=str(ckpt), arch="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


# ---------------------------------------------------------------- transformers CLIP (pickscore, aesthetic)

def write_clip_tokenizer_files(directory: Path):
    """vocab.json / merges.txt of the real CLIP BPE, rebuilt from open_clip's bundled merges."""
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = [tuple(line.split()) for line in gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_clip")
    write_clip_tokenizer_files(root)
    tokenizer = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(50.0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    model.save_pretrained(root)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root


def reference_clip(directory, images, prompts):
    """Image/text features straight from CLIPModel.forward with hand-made pixel values (32x32 needs no resize)."""
    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=(images - mean) / std)
    return model, out


def test_pickscore_matches_clip_logits(hf_clip_dir):
    images = quantised_images(4, 32, 32, seed=2)
    reward = build_reward("pickscore", model_path=str(hf_clip_dir))
    _, out = reference_clip(hf_clip_dir, images, PROMPTS)
    expected = out.logits_per_image.diagonal()  # logit_scale.exp() * cos(image_i, text_i)
    scores = reward(images, PROMPTS, None)
    assert torch.allclose(scores, expected, atol=1e-4)
    assert scores.abs().max() <= 50.0 + 1e-4  # |cos| <= 1 times the saved logit scale of 50
    scaled = build_reward("pickscore", model_path=str(hf_clip_dir), processor_path=str(hf_clip_dir), scale=1 / 26)
    assert torch.allclose(scaled(images, PROMPTS, None), expected / 26, atol=1e-5)


def test_pickscore_missing_directory_is_named(tmp_path, hf_clip_dir):
    with pytest.raises(FileNotFoundError, match=r"model_path='.*no_pickscore' is not an existing local directory"):
        build_reward("pickscore", model_path=str(tmp_path / "no_pickscore"))
    with pytest.raises(FileNotFoundError, match="processor_path="):
        build_reward("pickscore", model_path=str(hf_clip_dir), processor_path=str(tmp_path / "no_processor"))


def laion_style_head(dims, seed):
    """LAION aesthetic-v2 layout: Linear layers at layers.{0,2,4,6,7} (Dropout in between has no weights)."""
    g = torch.Generator().manual_seed(seed)
    keys = [0, 2, 4, 6, 7][: len(dims) - 1]
    return {f"layers.{k}.{part}": (torch.randn(dims[i + 1], dims[i], generator=g) / math.sqrt(dims[i])
                                   if part == "weight" else torch.randn(dims[i + 1], generator=g))
            for i, k in enumerate(keys) for part in ("weight", "bias")}


def test_aesthetic_mlp_head_matches_manual_chain(hf_clip_dir, tmp_path):
    head = laion_style_head([16, 32, 16, 8, 4, 1], seed=3)
    save_file(head, tmp_path / "head.safetensors")
    reward = build_reward("aesthetic", clip_path=str(hf_clip_dir), head_path=str(tmp_path / "head.safetensors"))
    images = quantised_images(3, 32, 32, seed=4)
    _, out = reference_clip(hf_clip_dir, images, PROMPTS[:3])
    x = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    for k in [0, 2, 4, 6, 7]:
        x = x @ head[f"layers.{k}.weight"].T + head[f"layers.{k}.bias"]
    assert torch.allclose(reward(images, PROMPTS[:3], None), x.squeeze(-1), atol=1e-5)


def test_aesthetic_linear_head_and_errors(hf_clip_dir, tmp_path):
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(1, 16, generator=g), torch.tensor([0.25])
    save_file({"weight": weight, "bias": bias}, tmp_path / "linear.safetensors")
    reward = build_reward("aesthetic", clip_path=str(hf_clip_dir), head_path=str(tmp_path / "linear.safetensors"))
    images = quantised_images(2, 32, 32, seed=6)
    _, out = reference_clip(hf_clip_dir, images, PROMPTS[:2])
    emb = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    assert torch.allclose(reward(images, ["", ""], None), (emb @ weight.T + bias).squeeze(-1), atol=1e-5)

    save_file(laion_style_head([768, 1024, 128, 64, 16, 1], seed=7), tmp_path / "vit_l_head.safetensors")
    with pytest.raises(ValueError, match="takes 768-d inputs but the CLIP model .* embeds to 16-d"):
        build_reward("aesthetic", clip_path=str(hf_clip_dir), head_path=str(tmp_path / "vit_l_head.safetensors"))
    broken = laion_style_head([16, 32, 16, 1], seed=8)
    broken["layers.2.weight"] = torch.zeros(16, 31)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="layers.2.weight takes 31 inputs but the previous layer gives 32"):
        build_reward("aesthetic", clip_path=str(hf_clip_dir), head_path=str(tmp_path / "broken.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"head_path='.*none\.safetensors'"):
        build_reward("aesthetic", clip_path=str(hf_clip_dir), head_path=str(tmp_path / "none.safetensors"))
    with pytest.raises(FileNotFoundError, match="clip_path="):
        build_reward("aesthetic", clip_path=str(tmp_path / "no_clip"), head_path=str(tmp_path / "linear.safetensors"))
