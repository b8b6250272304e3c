"""A transformers CLIP model, its image processor and tokenizer, all loaded from local directories.

Shared by PickScore and the aesthetic head. Directories are what ``save_pretrained`` writes (or a hub repo
snapshot you downloaded): ``config.json`` + weights for the model, ``preprocessor_config.json`` and the
tokenizer files for the processor.
"""
from __future__ import annotations

import torch

from flowgrpo.rewards.base import require_dir

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LocalClip:
    """Normalised CLIP image/text embeddings from a local transformers checkpoint (never the hub)."""

    def __init__(self, model_path: str, processor_path: str | None = None, *, device: str = "cpu",
                 dtype: str = "float32", need_text: bool = True, model_option: str = "model_path") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        model_dir = require_dir(model_path, model_option, "transformers CLIP model directory")
        proc_dir = require_dir(processor_path or model_path, "processor_path" if processor_path else model_option,
                               "CLIP processor directory (preprocessor_config.json, tokenizer files)")
        self.device, self.dtype = torch.device(device), _DTYPES[dtype]
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        self.model = self.model.to(self.device, self.dtype).eval()
        self.image_processor = CLIPImageProcessor.from_pretrained(proc_dir, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(proc_dir, local_files_only=True) if need_text else None
        self.max_text_len = self.model.config.text_config.max_position_embeddings

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> unit-norm projected image embeddings [B,D] (float32)."""
        pixels = self.image_processor(images=images.float().cpu(), do_rescale=False, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm projected text embeddings [B,D] (float32); long prompts are truncated."""
        if self.tokenizer is None:
            raise RuntimeError("this LocalClip was loaded without a tokenizer (need_text=False)")
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
