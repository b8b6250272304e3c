"""Text-rendering prompts for the embedded world: signs with a quoted word, and their ground-truth renders.

Gives the OCR reward a real task offline: 'a sign that says "GRPO"' has an exact answer that
`render_sign` draws, so OCR rewards, services and judges can be checked end to end.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("GRPO", "FLOW", "SHAPE", "REWARD", "CAT", "SIGN", "OPEN", "RED", "BLUE", "NOISE", "MODEL", "HELLO")
TEMPLATES = ('a sign that says "{}"', 'a poster with the word "{}"', 'a board reading "{}"')


def sign_prompts() -> list[dict]:
    """Every (template, word) prompt, with the word as metadata."""
    return [{"prompt": t.format(w), "text": w} for w in WORDS for t in TEMPLATES]


def render_sign(text: str, *, size: tuple[int, int] = (192, 64), font_size: int = 36,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Dark text on a light board, uint8 [H, W, 3]; `rng` jitters the position a little."""
    img = Image.new("RGB", size, (235, 230, 220))
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    dx, dy = (rng.integers(-6, 7, size=2) if rng is not None else (0, 0))
    draw.text(((size[0] - (x1 - x0)) // 2 - x0 + dx, (size[1] - (y1 - y0)) // 2 - y0 + dy), text, fill=(20, 20, 30),
              font=font)
    return np.asarray(img).copy()
