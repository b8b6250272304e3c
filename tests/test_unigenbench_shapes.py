"""UniGenBench on the Shapes world: prompt conversion, the verifier as judge, and the whole run offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgrpo.cli import main
from flowgrpo.eval.unigenbench import run_unigenbench
from flowgrpo.eval.unigenbench_data import load_prompts, write_prompts
from flowgrpo.eval.unigenbench_shapes import COLOR, LAYOUT, QUANTITY, SHAPE, ShapesJudge, load_shapes_rows, shapes_row
from flowgrpo.prompts.shapes import all_prompts
from flowgrpo.shapes import world as W
from flowgrpo.shapes.render import render
from flowgrpo.shapes.verify import verify


ENTRIES = {m["prompt"]: m for m in all_prompts()}


def entry(prompt: str) -> dict:
    return ENTRIES[prompt]


def picture(prompt: str, seed: int = 0) -> Image.Image:
    return Image.fromarray(render(entry(prompt), np.random.default_rng(seed)))


class ShapesPainter:
    """A real generator for the Shapes world: draws what a prompt asks (or, with `lie`, another prompt)."""

    def __init__(self, lie: dict[str, str] | None = None):
        self.lie = lie or {}

    def __call__(self, prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        rng = np.random.default_rng(seed)
        return [[Image.fromarray(render(ENTRIES[self.lie.get(p, p)], rng)) for _ in range(n)] for p in prompts]


@pytest.mark.parametrize("prompt, testpoints, descriptions", [
    ("a photo of a circle", [SHAPE], ["circle"]),
    ("a photo of a triangle and a square", [SHAPE], ["triangle; square"]),
    ("a photo of three squares", [SHAPE, QUANTITY], ["square", "exactly 3 squares"]),
    ("a photo of a blue triangle", [SHAPE, COLOR], ["triangle", "blue triangle"]),
    ("a photo of a circle left of a square", [SHAPE, LAYOUT], ["square; circle", "circle left of square"]),
    ("a photo of a red circle and a green triangle", [SHAPE, COLOR], ["circle; triangle", "red circle; green triangle"]),
])
def test_shapes_rows_in_unigenbench_form(prompt, testpoints, descriptions):
    row = shapes_row(5, entry(prompt))
    assert (row.index, row.prompt, row.lang) == (5, prompt, "en")
    assert [t.name for t in row.testpoints] == testpoints and list(row.descriptions) == descriptions
    assert row.sub_dims["Metadata"] == entry(prompt) and row.sub_dims["Secondary Categories"] == entry(prompt)["tag"]


def test_shapes_split_converts_and_round_trips_through_csv(tmp_path):
    rows = load_shapes_rows("test")
    assert len(rows) == 300 and [r.index for r in rows] == list(range(300))
    assert {t.primary for r in rows for t in r.testpoints} == {"Attribute", "Entity Layout"}
    write_prompts(tmp_path / "shapes.csv", rows)
    again = load_prompts(tmp_path / "shapes.csv")
    assert [(r.prompt, r.testpoints, r.descriptions, r.sub_dims["Metadata"]) for r in again] == \
           [(r.prompt, r.testpoints, r.descriptions, r.sub_dims["Metadata"]) for r in rows]
    ShapesJudge().validate(again)  # a written Shapes CSV is judged like the built-in set


@pytest.mark.parametrize("asked, drawn, scores", [
    ("a photo of a red circle", "a photo of a red circle", [1, 1]),
    ("a photo of a red circle", "a photo of a blue circle", [1, 0]),  # right shape, wrong colour
    ("a photo of a red circle", "a photo of a red square", [0, 0]),  # no circle: no red circle either
    ("a photo of four circles", "a photo of three circles", [1, 0]),  # too few
    ("a photo of three circles", "a photo of four circles", [1, 0]),  # one too many (GenEval's exclude)
    ("a photo of a circle left of a square", "a photo of a circle right of a square", [1, 0]),
    ("a photo of a red circle and a blue square", "a photo of a blue circle and a red square", [1, 0]),
    ("a photo of a triangle and a square", "a photo of a triangle", [0]),
])
def test_shapes_judge_scores_each_testpoint(asked, drawn, scores):
    row = shapes_row(0, entry(asked))
    result = ShapesJudge()(picture(drawn), row)
    assert result.scores == scores and result.error is None
    verdict = verify(np.asarray(picture(drawn)), entry(asked))
    assert all(result.scores) == verdict.passed  # every requirement lands in one testpoint
    assert result.raw.splitlines()[-1] == "[x] quality: no malformed objects"


def test_shapes_judge_fails_malformed_blobs_on_shape_and_refuses_foreign_rows():
    row = shapes_row(0, entry("a photo of a green square"))
    blob = np.full((W.IMAGE_SIZE, W.IMAGE_SIZE, 3), W.BACKGROUND, np.uint8)
    blob[4:28, 6:9] = W.COLORS["green"]  # a long thin bar: no shape of the world
    result = ShapesJudge()(Image.fromarray(blob), row)
    assert result.scores == [0, 0] and "[ ] quality: no malformed objects" in result.raw
    foreign = load_prompts(Path(__file__).parent / "fixtures" / "unigenbench_en_small.csv")
    with pytest.raises(ValueError, match="prompt 0 has no Shapes metadata"):
        ShapesJudge().validate(foreign)


def test_generation_and_shapes_judge_end_to_end(tmp_path):
    rows = load_shapes_rows("test")[::5]  # 60 prompts, 10 of each tag
    truth = run_unigenbench(rows, tmp_path / "truth", ShapesJudge(), generate=ShapesPainter(), n=2, batch_size=8)
    per_row = {r.index: r for r in rows}
    expected_totals: dict[str, int] = {}
    for r in rows:
        for t in r.testpoints:
            expected_totals[t.name] = expected_totals.get(t.name, 0) + 2
    assert {k: v["total"] for k, v in truth["sub_dimensions"].items()} == expected_totals
    assert truth["images"] == {"expected": 120, "judged": 120, "failed": 0}
    # Ground-truth renders satisfy their prompts: the verifier passes them all.
    assert truth["overall"] == 1.0
    # A model that swaps colours and relations is caught on exactly those testpoints.
    swapped = {}
    for r in rows:
        p = r.prompt
        for a, b in (("red", "blue"), ("left of", "right of"), ("above", "below")):
            if a in p or b in p:
                p = p.replace(a, "\0").replace(b, a).replace("\0", b)
        swapped[r.prompt] = p
    liar = run_unigenbench(rows, tmp_path / "liar", ShapesJudge(), generate=ShapesPainter(swapped), n=2, batch_size=8)
    assert liar["sub_dimensions"]["Attribute - Shape"]["accuracy"] == 1.0
    assert liar["sub_dimensions"]["Attribute - Quantity"]["accuracy"] == 1.0
    assert liar["sub_dimensions"][LAYOUT]["accuracy"] == 0.0
    changed = sum(2 for r in rows if any(t.name == COLOR for t in r.testpoints) and swapped[r.prompt] != r.prompt)
    colour = liar["sub_dimensions"][COLOR]
    assert colour["total"] - colour["correct"] == changed > 0
    lines = [json.loads(x) for x in (tmp_path / "liar" / "progress.jsonl").read_text().splitlines()]
    for rec in lines[:20]:  # each record agrees with the verifier run directly on the saved image
        image = np.asarray(Image.open(rec["image"]).convert("RGB"))
        assert all(rec["scores"]) == verify(image, per_row[rec["index"]].sub_dims["Metadata"]).passed


def test_cli_runs_offline_on_the_shapes_default(tmp_path, capsys):
    rows = load_shapes_rows("test")[:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for r in rows:
        for j in range(2):
            picture(r.prompt, seed=100 * r.index + j).save(folder / f"{r.index}_{j}.png")
    assert main(["eval", "unigenbench", "--images", str(folder), "--out", str(tmp_path / "out"), "--limit", "12", "--images-per-prompt", "2"]) == 0
    assert "UniGenBench overall 100.00%" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"]["judged"] == 24 and summary["overall"] == 1.0
    assert [p.name for p in (tmp_path / "out" / "grids").iterdir()] == ["Attribute.png"]  # single-object prompts only
