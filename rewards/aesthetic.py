"""Aesthetic reward: a linear or MLP head on unit-norm CLIP image embeddings, head weights from safetensors.

The LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``, on OpenAI CLIP ViT-L/14) is five
Linear layers 768→1024→128→64→16→1 stored as ``layers.{0,2,4,6,7}.weight/bias`` with only Dropout between
them, so the head here is a chain of Linear layers applied in key order with no activation. Convert once:
``safetensors.torch.save_file(torch.load("sac+logos+ava1-l14-linearMSE.pth"), "aesthetic_head.safetensors")``.
A single linear head is just ``weight`` [1,D] and ``bias`` [1].

Real use: ``{"clip_path": "/models/clip-vit-large-patch14", "head_path": "/models/aesthetic_head.safetensors"}``.
The reward is the head's raw output (about 1–10 for LAION v2).
"""
from __future__ import annotations

import re

import torch

from flowgrpo.rewards.base import Reward, require_file
from flowgrpo.rewards.hf_clip import LocalClip


def _layer_key(prefix: str) -> list[int | str]:
    # "layers.10" must sort after "layers.7": compare digit runs as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", prefix)]


def load_linear_chain(path: str, option: str = "head_path") -> torch.nn.Sequential:
    """Linear layers from a safetensors file of ``<prefix>weight`` / ``<prefix>bias`` pairs, in prefix order."""
    from safetensors.torch import load_file

    tensors = load_file(str(require_file(path, option, "aesthetic head safetensors file")))
    prefixes = sorted({k[: -len("weight")] for k in tensors if k.endswith("weight")}, key=_layer_key)
    if not prefixes:
        raise ValueError(f"{path}: no '*weight' tensors; expected Linear layers like layers.0.weight")
    layers = []
    for prefix in prefixes:
        weight, bias = tensors[prefix + "weight"], tensors.get(prefix + "bias")
        if weight.ndim != 2:
            raise ValueError(f"{path}: {prefix}weight has shape {tuple(weight.shape)}, expected [out, in]")
        if layers and layers[-1].out_features != weight.shape[1]:
            raise ValueError(f"{path}: {prefix}weight takes {weight.shape[1]} inputs but the previous layer gives "
                             f"{layers[-1].out_features}")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        layers.append(layer)
    if layers[-1].out_features != 1:
        raise ValueError(f"{path}: the last layer gives {layers[-1].out_features} outputs, expected 1")
    return torch.nn.Sequential(*layers).eval()


class AestheticScore(Reward):
    """head(normalise(CLIP image embedding)); the prompt is not used."""

    def __init__(self, clip_path: str, head_path: str, processor_path: str | None = None, device: str = "cpu",
                 dtype: str = "float32", name: str = "aesthetic") -> None:
        super().__init__()
        self.clip = LocalClip(clip_path, processor_path, device=device, dtype=dtype, need_text=False,
                              model_option="clip_path")
        self.head = load_linear_chain(head_path).to(self.clip.device)
        embed_dim = self.clip.model.config.projection_dim
        if self.head[0].in_features != embed_dim:
            raise ValueError(f"head {head_path} takes {self.head[0].in_features}-d inputs but the CLIP model at "
                             f"{clip_path} embeds to {embed_dim}-d")
        self.name = name

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return self.head(self.clip.image_embeds(images)).squeeze(-1)
