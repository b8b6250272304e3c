"""Image grids for people to look at: each image with its prompt (and a score) as a caption, and an optional
coloured border (pass/fail)."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS, FAIL = (40, 190, 60), (220, 40, 40)
LINE_HEIGHT = 11  # pixels per caption line (Pillow's built-in font)
CHAR_WIDTH = 6


def image_grid(images: list[np.ndarray], ncols: int, *, borders: list[tuple[int, int, int] | None] | None = None,
               captions: list[str] | None = None, scale: int = 4, pad: int = 2, caption_lines: int = 3) -> Image.Image:
    """Tile uint8 [H, W, 3] images (upscaled by `scale`, nearest) with optional borders and captions (wrapped to the
    cell's width, at most ``caption_lines`` lines each)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    h, w = images[0].shape[:2]
    cell_w = w * scale + 2 * pad
    width = max(1, (cell_w - 2 * pad) // CHAR_WIDTH)
    wrapped = [textwrap.wrap(c, width)[:caption_lines] for c in captions] if captions else None
    ch = (max(len(lines) for lines in wrapped) * LINE_HEIGHT + pad) if wrapped else 0
    cell_h = h * scale + 2 * pad + ch
    nrows = (len(images) + ncols - 1) // ncols
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, img in enumerate(images):
        x, y = (i % ncols) * cell_w, (i // ncols) * cell_h
        if borders and borders[i]:
            draw.rectangle([x, y, x + cell_w - 1, y + h * scale + 2 * pad - 1], fill=borders[i])
        grid.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (x + pad, y + pad))
        if wrapped:
            draw.multiline_text((x + pad, y + h * scale + 2 * pad), "\n".join(wrapped[i]), fill=(0, 0, 0),
                                font=font, spacing=1)
    return grid
