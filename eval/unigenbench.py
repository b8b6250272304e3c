"""The UniGenBench run: generate (or take) N images per prompt, judge each once, score, report.

Images live at `{images_dir}/{index}_{j}.png`, the benchmark's own layout. Every judged image is
appended to `{out}/progress.jsonl` as soon as its result arrives, so an interrupted run restarts
where it stopped: images with scores are never judged again, failed ones are retried.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from flowgrpo.eval.judge import JudgeResult
from flowgrpo.eval.unigenbench_data import PromptRow, write_prompts
from flowgrpo.eval.unigenbench_report import write_grids, write_report_md, write_results_csv

# generate(prompts, n, seed) -> one list of n images per prompt; one call's images depend only on its arguments.
Generator = Callable[[list[str], int, int], Sequence[Sequence[Image.Image]]]
Judge = Callable[[Image.Image, PromptRow], JudgeResult]
Key = tuple[int, int]  # (prompt index, image number j)


def image_path(images_dir: str | Path, index: int, j: int) -> Path:
    """Where image j of prompt `index` lives: `{images_dir}/{index}_{j}.png`."""
    return Path(images_dir) / f"{index}_{j}.png"


def generate_images(rows: list[PromptRow], generate: Generator, images_dir: str | Path, n: int = 4,
                    seed: int = 0, batch_size: int = 4) -> int:
    """Generate the missing images, `batch_size` prompts per call; returns how many were written.

    A batch's seed is `seed + index of its first prompt`, so a rerun with the same batch size redraws
    exactly the images it lacks. Files are written to a temporary name and renamed, so a killed run
    never leaves a truncated PNG behind.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=None):
        todo = [(r, j) for r in batch for j in range(n) if not image_path(images_dir, r.index, j).exists()]
        if not todo:
            continue
        images = generate([r.prompt for r in batch], n, seed + batch[0].index)
        if len(images) != len(batch) or any(len(per_prompt) != n for per_prompt in images):
            shape = [len(per_prompt) for per_prompt in images]
            raise ValueError(f"generate() returned images per prompt {shape}; expected {len(batch)} lists of {n}")
        by_key = {(r.index, j): img for r, per_prompt in zip(batch, images) for j, img in enumerate(per_prompt)}
        for r, j in todo:
            img = by_key[(r.index, j)]
            if not isinstance(img, Image.Image):
                raise TypeError(f"generate() returned {type(img).__name__} for prompt {r.index}; expected PIL.Image.Image")
            target = image_path(images_dir, r.index, j)
            tmp = target.with_name(target.name + ".tmp")
            img.convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, target)
            written += 1
    return written


def check_images(rows: list[PromptRow], images_dir: str | Path, n: int) -> None:
    """Raise FileNotFoundError naming the missing `{index}_{j}.png` files, if any."""
    missing = [image_path(images_dir, r.index, j) for r in rows for j in range(n)]
    missing = [p for p in missing if not p.is_file()]
    if missing:
        shown = ", ".join(p.name for p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(rows) * n} images missing in {images_dir} (e.g. {shown}); "
                                "expected {index}_{j}.png for j in 0..n-1")


def read_progress(path: str | Path, rows: list[PromptRow], judge_name: str) -> dict[Key, dict]:
    """The latest record per image from a progress file; checks it belongs to these prompts and judge.

    A final line cut short by a kill is ignored (that image is judged again); any other bad line is an error.
    """
    path = Path(path)
    if not path.exists():
        return {}
    by_index = {r.index: r for r in rows}
    lines = path.read_text(encoding="utf-8").split("\n")
    records: dict[Key, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no trailing newline: the write was interrupted
                continue
            raise ValueError(f"{path}, line {number}: not JSON; the progress file is damaged") from None
        row = by_index.get(rec["index"])
        if row is None:
            continue  # a prompt outside this run's selection (e.g. a larger --limit before)
        if rec["judge"] != judge_name or rec["prompt"] != row.prompt or rec["testpoints"] != [t.name for t in row.testpoints]:
            raise ValueError(f"{path}, line {number}: written for a different prompt or judge than this run "
                             f"(index {rec['index']}, judge {rec['judge']!r} vs {judge_name!r}); use a new output folder")
        records[(rec["index"], rec["j"])] = rec
    return records


def _judge_one(judge: Judge, row: PromptRow, path: Path) -> JudgeResult:
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except OSError as err:
        raise RuntimeError(f"cannot read image {path}: {err}") from None
    result = judge(image, row)
    if result.scores is not None and (len(result.scores) != len(row.testpoints) or any(s not in (0, 1) for s in result.scores)):
        raise ValueError(f"judge returned scores {result.scores} for the {len(row.testpoints)} testpoints of prompt "
                         f"{row.index}; expected one 0/1 each (return scores=None with an error instead)")
    return result


def judge_images(rows: list[PromptRow], images_dir: str | Path, judge: Judge, progress_path: str | Path,
                 n: int = 4, concurrency: int = 8) -> dict[Key, dict]:
    """Judge every image that has no scores yet, `concurrency` at a time; returns all records.

    Each result is appended to the progress file (one JSON line, flushed) from this thread only, so
    the file is the exact set of answers received, whatever is killed and when.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    judge_name = getattr(judge, "name", getattr(judge, "__name__", type(judge).__name__))
    if hasattr(judge, "validate"):
        judge.validate(rows)
    progress_path = Path(progress_path)
    records = read_progress(progress_path, rows, judge_name)
    pending = [(r, j) for r in rows for j in range(n) if (records.get((r.index, j)) or {}).get("scores") is None]
    if progress_path.exists():
        data = progress_path.read_bytes()
        if data and not data.endswith(b"\n"):  # drop a line cut short by a kill before appending
            progress_path.write_bytes(data[: data.rfind(b"\n") + 1])
    with open(progress_path, "a", encoding="utf-8") as out, ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(_judge_one, judge, r, image_path(images_dir, r.index, j)): (r, j) for r, j in pending}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="judge", disable=None):
                row, j = futures[future]
                result = future.result()
                rec = {"index": row.index, "j": j, "image": str(image_path(images_dir, row.index, j)),
                       "prompt": row.prompt, "testpoints": [t.name for t in row.testpoints], "judge": judge_name,
                       "scores": result.scores, "raw": result.raw, "error": result.error, "attempts": result.attempts}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                records[(row.index, j)] = rec
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return records


def summarize(rows: list[PromptRow], records: dict[Key, dict], n: int) -> dict:
    """UniGenBench's score schema from per-image records, plus overall = mean of primary accuracies.

    Images whose judging failed count in no dimension; they are listed under `failures`.
    """
    counts: dict[str, dict[str, list[int]]] = {"primary_dimensions": {}, "sub_dimensions": {}}
    failures, judged = [], 0
    for row in rows:
        for j in range(n):
            rec = records.get((row.index, j))
            if rec is None or rec["scores"] is None:
                failures.append({"index": row.index, "j": j, "error": rec["error"] if rec else "not judged"})
                continue
            judged += 1
            for tp, score in zip(row.testpoints, rec["scores"], strict=True):
                for table, name in (("primary_dimensions", tp.primary), ("sub_dimensions", tp.name)):
                    tally = counts[table].setdefault(name, [0, 0])
                    tally[0] += score
                    tally[1] += 1
    summary: dict = {
        table: {name: {"correct": c, "total": t, "accuracy": c / t} for name, (c, t) in sorted(tallies.items())}
        for table, tallies in counts.items()
    }
    primary = [d["accuracy"] for d in summary["primary_dimensions"].values()]
    summary["overall"] = sum(primary) / len(primary) if primary else None
    summary["images"] = {"expected": len(rows) * n, "judged": judged, "failed": len(failures)}
    summary["failures"] = failures
    return summary


def run_unigenbench(rows: list[PromptRow], out_dir: str | Path, judge: Judge, *, generate: Generator | None = None,
                    images_dir: str | Path | None = None, n: int = 4, seed: int = 0, batch_size: int = 4,
                    concurrency: int = 8, grid_size: int = 16) -> dict:
    """The whole protocol; writes prompts.csv, progress.jsonl, results.csv, summary.json, report.md, grids/.

    Give exactly one of `generate` (images go to `{out_dir}/images`) and `images_dir` (judged in place).
    Returns the summary.
    """
    if n < 1 or grid_size < 1:
        raise ValueError(f"n and grid_size must be >= 1, got n={n}, grid_size={grid_size}")
    if (generate is None) == (images_dir is None):
        raise ValueError("give exactly one of generate (a model) and images_dir (pre-generated images)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if generate is not None:
        images_dir = out_dir / "images"
        generate_images(rows, generate, images_dir, n=n, seed=seed, batch_size=batch_size)
    check_images(rows, images_dir, n)
    write_prompts(out_dir / "prompts.csv", rows)
    records = judge_images(rows, images_dir, judge, out_dir / "progress.jsonl", n=n, concurrency=concurrency)
    summary = summarize(rows, records, n)
    write_results_csv(out_dir / "results.csv", rows, records, n)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_report_md(out_dir / "report.md", summary)
    write_grids(out_dir / "grids", rows, records, n, images_dir, per_grid=grid_size)
    if summary["images"]["failed"]:
        print(f"warning: {summary['images']['failed']} images could not be judged and are excluded from the "
              f"scores (see {out_dir / 'summary.json'}); rerun the same command to retry them", file=sys.stderr)
    return summary
