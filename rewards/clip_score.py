"""CLIPScore with an open_clip model loaded from a local checkpoint file.

reward = scale · max(cos(image_emb, text_emb), 0). With the default ``scale = 1`` the reward lies in [0, 1];
torchmetrics' CLIPScore is this with scale 100, Hessel et al.'s CLIP-S uses 2.5. GRPO normalises rewards per
group, so the scale only matters when mixing with other rewards in a weighted sum.

Real use: ``{"arch": "ViT-L-14", "checkpoint": "/models/open_clip_vit_l14_openai.bin"}`` (a file you
downloaded once, e.g. ``open_clip_pytorch_model.bin`` of the model's hub repo). A custom architecture can be
given as an open_clip JSON config file with ``model_config`` (its file name, minus ``.json``, is the arch).
"""
from __future__ import annotations

import torch

from flowgrpo.rewards.base import Reward, require_dir, require_file


class ClipScore(Reward):
    """Cosine image–text similarity of a local open_clip model (see module docstring for the scaling)."""

    def __init__(self, checkpoint: str, arch: str | None = None, model_config: str | None = None,
                 tokenizer_path: str | None = None, scale: float = 1.0, device: str = "cpu",
                 name: str = "clipscore") -> None:
        super().__init__()
        import open_clip

        weights = require_file(checkpoint, "checkpoint", "open_clip checkpoint")
        if model_config is not None:
            cfg_file = require_file(model_config, "model_config", "open_clip model config JSON")
            if arch is not None and arch != cfg_file.stem:
                raise ValueError(f"arch={arch!r} but model_config defines {cfg_file.stem!r} (its file name)")
            arch = cfg_file.stem
            open_clip.add_model_config(cfg_file)
        if not arch:
            raise ValueError("option 'arch' is required: one of open_clip.list_models() such as 'ViT-B-32', "
                             "or pass 'model_config'")
        if arch.startswith(("hf-hub:", "local-dir:")) or arch not in open_clip.list_models():
            raise ValueError(f"arch {arch!r} is not a registered open_clip architecture; use a built-in name "
                             f"(open_clip.list_models()) or 'model_config' with a local JSON file")
        text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(weights), device=device, pretrained_image=False)
        self.model.eval()
        if text_cfg.get("hf_tokenizer_name"):
            # Such archs name a hub tokenizer; the user must supply it as a local directory instead.
            tok_dir = require_dir(tokenizer_path, "tokenizer_path", f"Hugging Face tokenizer directory of {arch!r}")
            self.tokenizer = open_clip.tokenizer.HFTokenizer(str(tok_dir),
                                                             context_length=text_cfg.get("context_length", 77))
        else:
            self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.scale, self.name = torch.device(device), float(scale), name

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        # open_clip's eval transform (resize, centre crop, normalise) works on float tensors in [0, 1] as is.
        pixels = self.preprocess(images.to(self.device, torch.float32))
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return self.scale * (img * txt).sum(-1).clamp(min=0)

