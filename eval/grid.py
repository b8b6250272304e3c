"""Image grids for people to look at: optional coloured borders (pass/fail) and captions."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PASS, FAIL = (40, 190, 60), (220, 40, 40)


def image_grid(images: list[np.ndarray], ncols: int, *, borders: list[tuple[int, int, int] | None] | None = None,
               captions: list[str] | None = None, scale: int = 4, pad: int = 2, caption_height: int = 12) -> Image.Image:
    """Tile uint8 [H, W, 3] images (upscaled by `scale`, nearest) with optional borders and captions."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    h, w = images[0].shape[:2]
    ch = caption_height if captions else 0
    cell_w, cell_h = w * scale + 2 * pad, h * scale + 2 * pad + ch
    nrows = (len(images) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % ncols) * cell_w, (i // ncols) * cell_h
        if borders and borders[i]:
            draw.rectangle([x, y, x + cell_w - 1, y + h * scale + 2 * pad - 1], fill=borders[i])
        grid.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (x + pad, y + pad))
        if captions:
            draw.text((x + pad, y + h * scale + 2 * pad), captions[i][: cell_w // 6], fill=(0, 0, 0))
    return grid
