"""UniGenBench outputs a person reads: results CSV, markdown score tables, image grids per dimension."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from PIL import Image, ImageDraw

from flowgrpo.eval.unigenbench_data import PromptRow

PASS, FAIL, UNJUDGED = (40, 160, 60), (200, 40, 40), (140, 140, 140)


def write_results_csv(path: str | Path, rows: list[PromptRow], records: dict, n: int) -> None:
    """One line per image: index, j, prompt, image, testpoints, scores, judge output, error, attempts."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "j", "prompt", "image", "testpoints", "scores", "judge_output", "error", "attempts"])
        for row in rows:
            for j in range(n):
                rec = records.get((row.index, j), {})
                scores = rec.get("scores")
                writer.writerow([
                    row.index, j, row.prompt, rec.get("image", ""),
                    json.dumps([t.name for t in row.testpoints], ensure_ascii=False),
                    "" if scores is None else json.dumps(scores), rec.get("raw", ""),
                    rec.get("error") or ("" if rec else "not judged"), rec.get("attempts", 0),
                ])


def _table(dims: dict) -> list[str]:
    lines = ["| Dimension | Correct | Total | Accuracy |", "|---|---:|---:|---:|"]
    for name, d in dims.items():
        lines.append(f"| {name.replace('|', chr(92) + '|')} | {d['correct']} | {d['total']} | {d['accuracy']:.2%} |")
    return lines


def write_report_md(path: str | Path, summary: dict) -> None:
    """Markdown: overall score, primary and sub-dimension tables, and the failures if there are any."""
    images = summary["images"]
    overall = "n/a" if summary["overall"] is None else f"{summary['overall']:.2%}"
    lines = [
        "# UniGenBench report", "",
        f"Overall (mean of {len(summary['primary_dimensions'])} primary-dimension accuracies): **{overall}**", "",
        f"Images judged: {images['judged']} of {images['expected']}; failed: {images['failed']}.", "",
        "## Primary dimensions", "", *_table(summary["primary_dimensions"]), "",
        "## Sub-dimensions", "", *_table(summary["sub_dimensions"]), "",
    ]
    if summary["failures"]:
        lines += ["## Images not judged (excluded from all scores)", ""]
        lines += [f"- `{f['index']}_{f['j']}.png`: {f['error']}" for f in summary["failures"]]
        lines.append("")
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _tile(path: Path, size: int, colour: tuple[int, int, int], caption: str) -> Image.Image:
    border, text_h = 4, 14
    with Image.open(path) as img:
        img = img.convert("RGB")
        # Small images (the Shapes world is 32 px) are enlarged without blurring their edges.
        resample = Image.Resampling.NEAREST if max(img.size) < size else Image.Resampling.LANCZOS
        img = img.resize((size, size), resample)
    tile = Image.new("RGB", (size + 2 * border, size + 2 * border + text_h), colour)
    tile.paste(img, (border, border))
    ImageDraw.Draw(tile).text((border, size + 2 * border), caption, fill=(255, 255, 255))
    return tile


def _colour(row: PromptRow, rec: dict | None, primary: str) -> tuple[int, int, int]:
    scores = (rec or {}).get("scores")
    if scores is None:
        return UNJUDGED
    return PASS if all(s for s, t in zip(scores, row.testpoints) if t.primary == primary) else FAIL


def write_grids(out_dir: str | Path, rows: list[PromptRow], records: dict, n: int, images_dir: str | Path,
                per_grid: int = 16, tile: int = 128) -> list[Path]:
    """One PNG per primary dimension with up to `per_grid` images of its prompts.

    Border colour: green = every testpoint of that dimension passed, red = one failed, grey = not judged.
    """
    if per_grid < 1:
        raise ValueError(f"per_grid must be >= 1, got {per_grid}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    primaries = sorted({t.primary for r in rows for t in r.testpoints})
    written = []
    for primary in primaries:
        # As many different prompts as fit, spread over the list; with few prompts, several images each.
        prompts = [r for r in rows if any(t.primary == primary for t in r.testpoints)]
        if len(prompts) >= per_grid:
            picks = [(prompts[k * len(prompts) // per_grid], 0) for k in range(per_grid)]
        else:
            picks = [(r, j) for j in range(n) for r in prompts][:per_grid]
        cells = [_tile(Path(images_dir) / f"{r.index}_{j}.png", tile, _colour(r, records.get((r.index, j)), primary),
                       f"{r.index}_{j}") for r, j in picks]
        cols = math.ceil(math.sqrt(len(cells)))
        width, height = cells[0].size
        grid = Image.new("RGB", (cols * width, math.ceil(len(cells) / cols) * height), (255, 255, 255))
        for k, cell in enumerate(cells):
            grid.paste(cell, ((k % cols) * width, (k // cols) * height))
        target = out_dir / (re.sub(r"[^\w]+", "_", primary).strip("_") + ".png")
        grid.save(target)
        written.append(target)
    return written
