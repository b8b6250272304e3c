"""UniGenBench on the Shapes world: its prompts as UniGenBench rows and the exact verifier as the judge.

Each GenEval-format entry becomes a row whose testpoints are the Shapes-relevant UniGenBench
sub-dimensions; the entry itself rides along in `sub_dims["Metadata"]`, so a written CSV is judged
by `ShapesJudge` as well. The judge maps the verifier's requirements onto those testpoints:

- Attribute - Shape: every named shape is found, presence requirements hold, nothing is malformed;
- Attribute - Quantity: the count requirements (at least n, and fewer than n+1 when excluded);
- Attribute - Color: the colour requirements;
- Entity Layout - Two-Dimensional Space: the relative-position requirements.

Every requirement lands in exactly one testpoint, so an image scores 1 on all of them iff it passes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from flowgrpo.eval.judge import JudgeResult
from flowgrpo.eval.unigenbench_data import PromptRow, parse_testpoint

SHAPE, QUANTITY, COLOR, LAYOUT = "Attribute - Shape", "Attribute - Quantity", "Attribute - Color", \
    "Entity Layout - Two-Dimensional Space"
KIND_TO_TESTPOINT = {"presence": SHAPE, "quality": SHAPE, "count": QUANTITY, "color": COLOR, "position": LAYOUT}


def _phrase(item: dict) -> str:
    words = [str(item["count"])] if int(item.get("count", 1)) > 1 else []
    return " ".join(words + ([item["color"]] if "color" in item else []) + [item["class"]])


def shapes_row(index: int, meta: dict) -> PromptRow:
    """One Shapes metadata entry as a UniGenBench row (testpoints in a fixed order)."""
    include = meta["include"]
    points = {SHAPE: "; ".join(dict.fromkeys(it["class"] for it in include))}
    if any(int(it.get("count", 1)) > 1 for it in include) or meta.get("exclude"):
        points[QUANTITY] = "; ".join(f"exactly {it['count']} {it['class']}{'s' if int(it['count']) > 1 else ''}"
                                     for it in include)
    if any("color" in it for it in include):
        points[COLOR] = "; ".join(_phrase(it) for it in include if "color" in it)
    if any("position" in it for it in include):
        points[LAYOUT] = "; ".join(f"{it['class']} {it['position'][0]} {include[it['position'][1]]['class']}"
                                   for it in include if "position" in it)
    sub_dims = {"Primary Categories": "Shapes", "Secondary Categories": meta["tag"],
                "Testpoints": list(points), "Testpoint Description": list(points.values()), "Metadata": meta}
    return PromptRow(index, meta["prompt"], tuple(parse_testpoint(p) for p in points), tuple(points.values()),
                     "en", sub_dims)


def load_shapes_rows(split: str = "test") -> list[PromptRow]:
    """The Shapes prompt split (`flowgrpo.prompts.shapes.load_split`) as UniGenBench rows, indexed 0.."""
    from flowgrpo.prompts.shapes import load_split

    return [shapes_row(i, meta) for i, meta in enumerate(load_split(split))]


class ShapesJudge:
    """Programmatic UniGenBench judge for Shapes images, from `flowgrpo.shapes.verify.verify`."""

    name = "shapes-verifier"

    def validate(self, rows: list[PromptRow]) -> None:
        """Every row must carry its Shapes metadata and only testpoints this judge can score."""
        for row in rows:
            if not isinstance(row.sub_dims.get("Metadata"), dict):
                raise ValueError(f"prompt {row.index} has no Shapes metadata (sub_dims['Metadata']); "
                                 "the Shapes judge only scores Shapes prompt sets")
            unknown = [t.name for t in row.testpoints if t.name not in KIND_TO_TESTPOINT.values()]
            if unknown:
                raise ValueError(f"prompt {row.index}: the Shapes judge cannot score testpoints {unknown}")

    def __call__(self, image: Image.Image, row: PromptRow) -> JudgeResult:
        from flowgrpo.shapes.verify import verify

        meta = row.sub_dims["Metadata"]
        verdict = verify(np.asarray(image.convert("RGB"), dtype=np.uint8), meta)
        raw = "\n".join(f"[{'x' if r.ok else ' '}] {r.kind}: {r.text}" for r in verdict.requirements)
        names = [t.name for t in row.testpoints]
        results: dict[str, list[bool]] = {name: [] for name in names}
        for req in verdict.requirements:
            target = KIND_TO_TESTPOINT.get(req.kind)
            if target not in results:
                return JudgeResult(None, raw, f"requirement {req.kind!r} ({req.text}) matches no testpoint of the row")
            results[target].append(req.ok)
        if SHAPE in results:  # a counted shape has no presence requirement: check it was seen at all
            found = {d.shape for d in verdict.detections}
            results[SHAPE] += [it["class"] in found for it in meta["include"]]
        empty = [name for name, oks in results.items() if not oks]
        if empty:
            return JudgeResult(None, raw, f"the verifier gave no requirement for testpoints {empty}")
        return JudgeResult([int(all(results[name])) for name in names], raw)
