"""Float images [..., 3, H, W] in [0, 1] -> 8-bit pixels (rounded to the nearest level, values outside [0, 1]
clipped), as tensors, HWC arrays or PIL images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] floats in [0, 1] -> uint8 of the same layout."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] floats in [0, 1] -> uint8 [H, W, 3] arrays (what PIL, the verifier and the grids take)."""
    return list(to_pixels(images).permute(0, 2, 3, 1).cpu().numpy())


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]
