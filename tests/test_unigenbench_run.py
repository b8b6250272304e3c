"""The UniGenBench run without a network: generation through a real callable, scoring, progress, outputs."""
from __future__ import annotations

import csv
import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flowgrpo.eval.judge import JudgeResult
from flowgrpo.eval.unigenbench import generate_images, judge_images, read_progress, run_unigenbench, summarize
from flowgrpo.eval.unigenbench_data import PromptRow, load_prompts, parse_testpoint
from flowgrpo.eval.unigenbench_report import FAIL, PASS, write_grids

FIXTURES = Path(__file__).parent / "fixtures"


def draw(prompt: str, j: int, seed: int) -> Image.Image:
    """A 24x24 picture determined by (prompt, j, seed): coloured boxes on a coloured ground."""
    rng = random.Random(zlib.crc32(f"{prompt}|{j}|{seed}".encode()))
    img = Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3)))
    pen = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(20), rng.randrange(20)
        pen.rectangle((x, y, x + rng.randrange(2, 8), y + rng.randrange(2, 8)), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


class Painter:
    """A real text-to-image callable (PIL drawing) with the generator contract; counts its calls."""

    def __init__(self):
        self.calls: list[tuple[list[str], int, int]] = []

    def __call__(self, prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        self.calls.append((list(prompts), n, seed))
        return [[draw(p, j, seed) for j in range(n)] for p in prompts]


def corner_judge(image: Image.Image, row: PromptRow) -> JudgeResult:
    """Programmatic judge: testpoint k passes if channel k % 3 of the top-left pixel is bright."""
    pixel = image.getpixel((0, 0))
    return JudgeResult([int(pixel[k % 3] > 127) for k in range(len(row.testpoints))], f"pixel {pixel}")


def row(index: int, names: list[str]) -> PromptRow:
    return PromptRow(index, f"prompt {index}", tuple(parse_testpoint(n) for n in names), tuple(names), "en", {})


def test_summary_by_hand():
    rows = [row(0, ["Attribute - Color", "Style"]), row(1, ["Attribute - Quantity", "Attribute - Color"])]
    records = {(0, 0): {"scores": [1, 0]}, (0, 1): {"scores": [1, 1]}, (1, 0): {"scores": [0, 1]},
               (1, 1): {"scores": None, "error": "judge gave up"}}
    s = summarize(rows, records, n=2)
    assert s["primary_dimensions"] == {"Attribute": {"correct": 3, "total": 4, "accuracy": 0.75},
                                       "Style": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert s["sub_dimensions"] == {"Attribute - Color": {"correct": 3, "total": 3, "accuracy": 1.0},
                                   "Attribute - Quantity": {"correct": 0, "total": 1, "accuracy": 0.0},
                                   "Style": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert s["overall"] == pytest.approx(0.625)  # mean of primaries, not 4/6 pooled over testpoints
    assert s["images"] == {"expected": 4, "judged": 3, "failed": 1}
    assert s["failures"] == [{"index": 1, "j": 1, "error": "judge gave up"}]
    assert summarize(rows, {}, n=1)["overall"] is None


def test_generation_layout_seeds_and_resume(tmp_path):
    rows = load_prompts(FIXTURES / "unigenbench_en_small.csv")
    painter = Painter()
    assert generate_images(rows, painter, tmp_path, n=3, seed=10, batch_size=2) == 15
    assert painter.calls == [([rows[0].prompt, rows[1].prompt], 3, 10), ([rows[2].prompt, rows[3].prompt], 3, 12),
                             ([rows[4].prompt], 3, 14)]  # seed + index of the batch's first prompt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}_{j}.png" for i in range(5) for j in range(3))
    on_disk = np.asarray(Image.open(tmp_path / "3_1.png"))
    assert np.array_equal(on_disk, np.asarray(draw(rows[3].prompt, 1, 12)))
    # Interrupted run: two images of one batch lost; only that batch is drawn again, identically.
    (tmp_path / "2_0.png").unlink()
    (tmp_path / "3_2.png").unlink()
    painter.calls.clear()
    assert generate_images(rows, painter, tmp_path, n=3, seed=10, batch_size=2) == 2
    assert painter.calls == [([rows[2].prompt, rows[3].prompt], 3, 12)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "3_2.png")), np.asarray(draw(rows[3].prompt, 2, 12)))
    assert not list(tmp_path.glob("*.tmp"))


def test_generator_contract_violations(tmp_path):
    rows = load_prompts(FIXTURES / "unigenbench_en_small.csv", limit=2)
    with pytest.raises(ValueError, match=r"returned images per prompt \[1, 1\]; expected 2 lists of 2"):
        generate_images(rows, lambda p, n, s: [[draw(x, 0, s)] for x in p], tmp_path, n=2)
    with pytest.raises(TypeError, match="returned ndarray for prompt 0; expected PIL.Image.Image"):
        generate_images(rows, lambda p, n, s: [[np.zeros((4, 4, 3), np.uint8)] * n for _ in p], tmp_path, n=2)


def test_full_run_with_generation_and_a_programmatic_judge(tmp_path):
    rows = load_prompts(FIXTURES / "unigenbench_en_small.csv")
    summary = run_unigenbench(rows, tmp_path, corner_judge, generate=Painter(), n=2, seed=3, batch_size=2)
    # Expected scores straight from the drawn pixels.
    tallies: dict[str, list[int]] = {}
    for r in rows:
        for j in range(2):
            pixel = draw(r.prompt, j, 3 + r.index - r.index % 2).getpixel((0, 0))
            for k, tp in enumerate(r.testpoints):
                t = tallies.setdefault(tp.primary, [0, 0])
                t[0] += pixel[k % 3] > 127
                t[1] += 1
    assert {k: (v["correct"], v["total"]) for k, v in summary["primary_dimensions"].items()} == \
           {k: tuple(v) for k, v in tallies.items()}
    assert sum(d["total"] for d in summary["primary_dimensions"].values()) == 2 * 14  # testpoints x images
    assert sum(d["total"] for d in summary["sub_dimensions"].values()) == 2 * 14
    accs = [c / t for c, t in tallies.values()]
    assert summary["overall"] == pytest.approx(sum(accs) / len(accs))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    with open(tmp_path / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert [(int(r["index"]), int(r["j"])) for r in results] == [(i, j) for i in range(5) for j in range(2)]
    first = results[0]
    assert first["image"] == str(tmp_path / "images" / "0_0.png") and first["prompt"] == rows[0].prompt
    assert json.loads(first["testpoints"]) == ["Style", "Attribute - Quantity", "Attribute - Color", "Attribute - Material"]
    assert json.loads(first["scores"]) == corner_judge(Image.open(tmp_path / "images" / "0_0.png").convert("RGB"), rows[0]).scores
    assert first["judge_output"].startswith("pixel (") and first["error"] == ""
    report = (tmp_path / "report.md").read_text()
    assert f"**{summary['overall']:.2%}**" in report and "| Attribute |" in report and "| Attribute - Color |" in report
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == sorted(f"{p.replace(' ', '_')}.png" for p in tallies)
    # Attribute appears in prompts 0, 3 (2 images each): 4 tiles of 136x150 in a 2x2 grid.
    grid = Image.open(tmp_path / "grids" / "Attribute.png").convert("RGB")
    assert grid.size == (2 * 136, 2 * 150)
    attribute = [k for k, t in enumerate(rows[3].testpoints) if t.primary == "Attribute"]  # tile 4 is 3_1
    passed = all(corner_judge(Image.open(tmp_path / "images" / "3_1.png").convert("RGB"), rows[3]).scores[k] for k in attribute)
    assert grid.getpixel((136 + 1, 150 + 1)) == (PASS if passed else FAIL)
    records = read_progress(tmp_path / "progress.jsonl", rows, "corner_judge")
    (few,) = write_grids(tmp_path / "few", rows[:4], records, 2, tmp_path / "images", per_grid=1)[1:2]
    assert few.name == "Attribute.png" and Image.open(few).size == (136, 150)
    assert len((tmp_path / "progress.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "prompts.csv").exists() and len(load_prompts(tmp_path / "prompts.csv")) == 5


def test_progress_resume_truncated_line_and_mismatches(tmp_path):
    rows = load_prompts(FIXTURES / "unigenbench_en_small.csv", limit=2)
    generate_images(rows, Painter(), tmp_path / "img", n=2)
    calls = []

    def counting_judge(image, r):
        calls.append(r.index)
        return corner_judge(image, r)

    progress = tmp_path / "progress.jsonl"
    judge_images(rows, tmp_path / "img", counting_judge, progress, n=2, concurrency=2)
    lines = progress.read_text().splitlines()
    # Simulate a kill during the last write: half a line, no newline.
    progress.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    calls.clear()
    records = judge_images(rows, tmp_path / "img", counting_judge, progress, n=2, concurrency=2)
    assert len(calls) == 1 and len(records) == 4
    assert sorted((r["index"], r["j"]) for r in map(json.loads, progress.read_text().splitlines())) == \
           [(0, 0), (0, 1), (1, 0), (1, 1)]  # the cut line is gone, its image judged once more
    assert len(read_progress(progress, rows, "counting_judge")) == 4
    with pytest.raises(ValueError, match="different prompt or judge"):
        read_progress(progress, rows, "another_judge")
    changed = [PromptRow(rows[0].index, "another prompt", rows[0].testpoints, rows[0].descriptions, "en", {})] + rows[1:]
    with pytest.raises(ValueError, match="different prompt or judge"):
        read_progress(progress, changed, "counting_judge")
    progress.write_text("{broken\n" + progress.read_text())
    with pytest.raises(ValueError, match="line 1: not JSON"):
        read_progress(progress, rows, "counting_judge")


def test_bad_judge_output_and_arguments_are_errors(tmp_path):
    rows = load_prompts(FIXTURES / "unigenbench_en_small.csv", limit=1)
    generate_images(rows, Painter(), tmp_path / "img", n=1)
    with pytest.raises(ValueError, match="judge returned scores \\[1\\] for the 4 testpoints of prompt 0"):
        judge_images(rows, tmp_path / "img", lambda im, r: JudgeResult([1], ""), tmp_path / "p.jsonl", n=1)
    with pytest.raises(ValueError, match="exactly one of generate"):
        run_unigenbench(rows, tmp_path / "o", corner_judge, n=1)
    with pytest.raises(FileNotFoundError, match="1 of 2 images missing .* 0_1.png"):
        run_unigenbench(rows, tmp_path / "o", corner_judge, images_dir=tmp_path / "img", n=2)
