"""Ground-truth renderer: draws an image that satisfies a Shapes metadata entry."""
from __future__ import annotations

import numpy as np

from flowgrpo.shapes import world as W


def shape_mask(shape: str, cx: float, cy: float, size: int = W.IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of one shape centred at (cx, cy), sampled at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= W.CIRCLE_RADIUS**2
    if shape == "square":
        h = W.SQUARE_HALF
        return (np.abs(xs - cx) < h) & (np.abs(ys - cy) < h)
    if shape == "triangle":
        top, bottom = cy - W.TRIANGLE_HEIGHT / 2, cy + W.TRIANGLE_HEIGHT / 2
        half_width = (ys - top) / W.TRIANGLE_HEIGHT * (W.TRIANGLE_BASE / 2)
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; known: {W.SHAPES}")


def _cell_centre(cell: int) -> tuple[float, float]:
    row, col = divmod(cell, W.GRID)
    return (col + 0.5) * W.CELL, (row + 0.5) * W.CELL


def _objects_for(meta: dict, rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """(shape, colour, cell) for every object the entry asks for, with free attributes drawn at random."""
    include = meta["include"]
    colours = list(W.COLORS)
    cells = list(rng.permutation(W.GRID * W.GRID))
    if any("position" in item for item in include):
        # Place the pair in one row (left/right) or one column (above/below) so the image shows
        # exactly the asked relation and no second one.
        (a_idx, item) = next((i, it) for i, it in enumerate(include) if "position" in it)
        relation, b_idx = item["position"]
        fixed = int(rng.integers(W.GRID))
        if relation in ("left of", "right of"):
            left, right = fixed * W.GRID, fixed * W.GRID + 1
            a_cell, b_cell = (left, right) if relation == "left of" else (right, left)
        else:
            top, bottom = fixed, W.GRID + fixed
            a_cell, b_cell = (top, bottom) if relation == "above" else (bottom, top)
        placed = {a_idx: [a_cell], b_idx: [b_cell]}
        cells = [c for c in cells if c not in (a_cell, b_cell)]
    else:
        placed = {}
    objects = []
    for i, item in enumerate(include):
        n = int(item.get("count", 1))
        for k in range(n):
            cell = placed[i][k] if i in placed else cells.pop(0)
            colour = item.get("color") or colours[int(rng.integers(len(colours)))]
            objects.append((item["class"], colour, cell))
    return objects


def render(meta: dict, rng: np.random.Generator) -> np.ndarray:
    """Render a ground-truth uint8 [H, W, 3] image for a GenEval-format Shapes entry."""
    n_objects = sum(int(it.get("count", 1)) for it in meta["include"])
    if n_objects > W.GRID * W.GRID:
        raise ValueError(f"{meta['prompt']!r} asks for {n_objects} objects; the world holds at most {W.GRID ** 2}")
    image = np.empty((W.IMAGE_SIZE, W.IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = W.BACKGROUND
    for shape, colour, cell in _objects_for(meta, rng):
        cx, cy = _cell_centre(cell)
        dx, dy = rng.integers(-W.JITTER, W.JITTER + 1, size=2)
        image[shape_mask(shape, cx + dx, cy + dy)] = W.COLORS[colour]
    return image
