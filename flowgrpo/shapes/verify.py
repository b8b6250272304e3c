"""Exact verifier for Shapes images, GenEval-style.

Segments the image (pixels far from the grey background, holes filled, 4-connected components),
classifies each component's shape by IoU with ideal templates fitted to its bounding box and its
colour by the nearest palette colour of its interior median, then checks the metadata entry with
GenEval's rules (counts, colours, exclusions, relative position). Any malformed component (ragged
blob, merged shapes, off-palette colour mass too large to be a shape) fails the image: that is the
image-quality guard. `score` is the fraction of requirements met, usable as a dense reward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowgrpo.shapes import world as W

FG_THRESHOLD = 60  # max channel distance from background that makes a pixel foreground
MIN_AREA = 14  # smaller components are specks, ignored like a detector would
MAX_EXTENT = 18  # bigger bounding boxes are merged or smeared objects
MAX_ASPECT = 1.6
MIN_IOU = 0.72  # IoU with the best-fitting ideal template
MAX_COLOR_DIST = 90.0  # interior median farther than this from every palette colour -> no colour
POSITION_THRESHOLD = 0.1  # GenEval's relative-position margin
REQUIREMENT_KINDS = ("presence", "count", "color", "position", "quality")


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None = malformed
    color: str | None
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    iou: float


@dataclass(frozen=True)
class Requirement:
    kind: str  # one of REQUIREMENT_KINDS
    text: str
    ok: bool
    item: int  # index into meta["include"] (-1 for exclusions and quality)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float
    requirements: list[Requirement]
    detections: list[Detection] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        return sum(d.shape is None for d in self.detections)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an [N, 2] array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Background pixels not connected to the border become foreground: the background reachable from the border
    grows one 4-neighbour ring per round (whole-array operations: the background is most of the image)."""
    bg = ~fg
    outside = np.zeros_like(fg)
    outside[[0, -1], :], outside[:, [0, -1]] = bg[[0, -1], :], bg[:, [0, -1]]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= bg
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _templates(w: int, h: int) -> dict[str, np.ndarray]:
    """Ideal masks of each shape stretched to a w x h box, sampled at pixel centres."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    u, v = xs / w, ys / h  # in (0, 1)
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def _classify_colour(pixels: np.ndarray) -> str | None:
    median = np.median(pixels.astype(np.float64), axis=0)
    names = list(W.COLORS)
    dists = [np.linalg.norm(median - np.array(W.COLORS[n])) for n in names]
    best = int(np.argmin(dists))
    return names[best] if dists[best] <= MAX_COLOR_DIST else None


def detect(image: np.ndarray) -> list[Detection]:
    """All objects in a uint8 [H, W, 3] image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    dist = np.abs(image.astype(np.int16) - np.array(W.BACKGROUND, dtype=np.int16)).max(axis=2)
    raw_fg = dist > FG_THRESHOLD
    fg = _fill_holes(raw_fg)
    out = []
    for comp in _components(fg):
        if len(comp) < MIN_AREA:
            continue
        ys, xs = comp[:, 0], comp[:, 1]
        y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        w, h = x1 - x0, y1 - y0
        local = np.zeros((h, w), dtype=bool)
        local[ys - y0, xs - x0] = True
        best, best_iou = None, 0.0
        for name, tmpl in _templates(w, h).items():
            iou = float((local & tmpl).sum() / (local | tmpl).sum())
            if iou > best_iou:
                best, best_iou = name, iou
        if max(w, h) > MAX_EXTENT or max(w, h) / min(w, h) > MAX_ASPECT or best_iou < MIN_IOU:
            best = None
        # Colour from the raw foreground pixels (not filled holes), interior if the shape has one.
        inner = raw_fg[ys, xs]
        pixels = image[ys[inner], xs[inner]] if inner.any() else image[ys, xs]
        out.append(Detection(best, _classify_colour(pixels), (int(x0), int(y0), int(x1), int(y1)), len(comp), best_iou))
    return out


def relative_position(a: Detection, b: Detection) -> set[str]:
    """GenEval's relation of box a to box b (image y grows downwards)."""
    ba, bb = np.array(a.box, dtype=np.float64), np.array(b.box, dtype=np.float64)
    ca, cb = (ba[:2] + ba[2:]) / 2, (bb[:2] + bb[2:]) / 2
    da, db = ba[2:] - ba[:2], bb[2:] - bb[:2]
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def verify(image: np.ndarray, meta: dict) -> Verdict:
    """Score one uint8 [H, W, 3] image against a GenEval-format Shapes entry."""
    dets = detect(image)
    reqs: list[Requirement] = []
    matched: list[list[Detection] | None] = []
    for i, item in enumerate(meta["include"]):
        cls, n = item["class"], int(item.get("count", 1))
        of_class = [d for d in dets if d.shape == cls]
        kind = "count" if n > 1 else "presence"
        reqs.append(Requirement(kind, f"at least {n} {cls}", len(of_class) >= n, i))
        ok = len(of_class) >= n
        found = of_class
        if "color" in item:
            found = [d for d in of_class if d.color == item["color"]]
            c_ok = len(found) >= n
            reqs.append(Requirement("color", f"{n} {item['color']} {cls}", c_ok, i))
            ok = ok and c_ok
        if "position" in item:
            rel, j = item["position"]
            targets = matched[j] if j < len(matched) else None
            p_ok = bool(ok and targets and found and all(
                rel in relative_position(d, t) for d in found[:n] for t in targets))
            reqs.append(Requirement("position", f"{cls} {rel} {meta['include'][j]['class']}", p_ok, i))
            ok = ok and p_ok
        matched.append(found[:n] if ok else None)
    for item in meta.get("exclude", []):
        cls, n = item["class"], int(item["count"])
        have = sum(d.shape == cls for d in dets)
        reqs.append(Requirement("count", f"fewer than {n} {cls}", have < n, -1))
    malformed = sum(d.shape is None for d in dets)
    reqs.append(Requirement("quality", "no malformed objects", malformed == 0, -1))
    score = sum(r.ok for r in reqs) / len(reqs)
    return Verdict(all(r.ok for r in reqs), score, reqs, dets)


def asked_objects(meta: dict) -> int:
    """How many objects an entry asks for in total ("two circles and a square" -> 3)."""
    return sum(int(item.get("count", 1)) for item in meta["include"])


def spare_objects(detections: list[Detection], meta: dict) -> int:
    """Well-formed objects drawn beyond the total the entry asks for (0 if none). GenEval's rule asks for "at least"
    the named objects outside counting prompts, so spares never fail an image there; a reward built on that rule
    pays for drawing them (a third object raises the odds that both of "a circle and a square" appear)."""
    return max(sum(d.shape is not None for d in detections) - asked_objects(meta), 0)


def background_noise(image: np.ndarray) -> float:
    """Mean absolute deviation from the grey background over pixels away from any object (0-255).

    Ground truth scores 0; grain that stays below the foreground threshold (invisible to `verify`)
    shows up here, so it serves as the image-quality guard beside the malformed-object rate.
    """
    dist = np.abs(image.astype(np.int16) - np.array(W.BACKGROUND, dtype=np.int16))
    near = dist.max(axis=2) > FG_THRESHOLD // 2
    grown = near.copy()  # dilate by 1 px so anti-aliased edges do not count as noise
    grown[1:] |= near[:-1]
    grown[:-1] |= near[1:]
    grown[:, 1:] |= near[:, :-1]
    grown[:, :-1] |= near[:, 1:]
    bg = ~grown
    return float(dist[bg].mean()) if bg.any() else 0.0
