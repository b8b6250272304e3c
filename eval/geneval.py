"""GenEval-style evaluation: per-tag accuracy with standard errors, JSON + markdown report and an image grid with
pass/fail borders. Images are scored by the exact Shapes verifier, or by any scorer returning its `Verdict`
(`flowgrpo.rewards.geneval_detector.GenevalScorer` for real GenEval classes)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from flowgrpo.eval.grid import FAIL, PASS, image_grid
from flowgrpo.eval.sampling import sharded_samples
from flowgrpo.media import to_uint8
from flowgrpo.prompts.loaders import ordered_tags
from flowgrpo.shapes import world as W
from flowgrpo.shapes.verify import REQUIREMENT_KINDS, background_noise, spare_objects, verify

COUNT_ERRORS = ("-2", "-1", "0", "+1", "+2")


@dataclass
class GenevalResult:
    accuracy: dict[str, float]  # per tag + "overall"
    stderr: dict[str, float]
    n_images: dict[str, int]
    malformed: float  # fraction of images holding a malformed object
    empty: float  # fraction of images with no object
    background_noise: float  # mean, 0-255 scale
    diversity: float  # mean pixel distance between images of the same prompt (0-255); a collapse lowers it
    # per tag: fraction of images failing each requirement kind (presence, count, color, position, quality)
    failures: dict[str, dict[str, float]]
    # counting entries: fraction of images per "drawn - asked" objects of the asked class ("-2" = two or more too few)
    count_errors: dict[str, float]
    # per tag: fraction of images with more well-formed objects than asked (`spare_objects`; GenEval passes them
    # outside counting, so accuracy hides a model that learns to hedge by drawing extra objects)
    spares: dict[str, float]
    grid: list[tuple[np.ndarray, bool, str]] = field(default_factory=list)  # (image, passed, prompt) to look at

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "n_images": self.n_images,
                "malformed": self.malformed, "empty": self.empty, "background_noise": self.background_noise,
                "diversity": self.diversity, "failures": self.failures, "count_errors": self.count_errors,
                "spares": self.spares}

    def metrics(self) -> dict[str, float]:
        """Scalars for the trackers."""
        return {f"eval/{k}": v for k, v in self.accuracy.items()} | {
            "eval/malformed": self.malformed, "eval/background_noise": self.background_noise,
            "eval/diversity": self.diversity}

    def line(self) -> str:
        return f"overall {100 * self.accuracy['overall']:.1f}% (malformed {100 * self.malformed:.1f}%)"

    def grid_image(self, per_row: int = 8):
        """The grid of the picked images (rows = tags), each with its prompt, green border = pass; None if none."""
        if not self.grid:
            return None
        return image_grid([img for img, _, _ in self.grid], per_row, borders=[PASS if ok else FAIL for _, ok, _ in
                                                                              self.grid],
                          captions=[prompt for _, _, prompt in self.grid])

    def write(self, out: str | Path, name: str = "model") -> Path:
        """results.json, report.md and grid.png."""
        return write_report(self, out, name=name)


def check_shapes_metadata(entries: list[dict]) -> None:
    classes = {it["class"] for e in entries for it in e["include"] + e.get("exclude", [])}
    unknown = sorted(classes - set(W.SHAPES))
    if unknown:
        raise ValueError(f"the bundled verifier knows the Shapes classes {W.SHAPES} only; this metadata asks for "
                         f"{unknown[:5]}{'...' if len(unknown) > 5 else ''}. Real GenEval classes need a COCO detector "
                         "and CLIP: flowgrpo.rewards.geneval_detector.GenevalScorer.")


def prompt_diversity(images: list[np.ndarray], entries: list[dict]) -> float:
    """Mean absolute pixel difference (0-255) between pairs of images made for the same entry, averaged over
    entries with at least two images; NaN when there are none. Mode collapse under a hacked reward lowers it."""
    dists = _diversities(images, entries)
    return float(np.mean(dists)) if dists else float("nan")


def _diversities(images: list[np.ndarray], entries: list[dict]) -> list[float]:
    by_prompt: dict[str, list[np.ndarray]] = defaultdict(list)
    for img, e in zip(images, entries):
        by_prompt[json.dumps(e, sort_keys=True)].append(img.astype(np.float32))
    return [float(np.mean([np.abs(a - b).mean() for i, a in enumerate(imgs) for b in imgs[i + 1:]]))
            for imgs in by_prompt.values() if len(imgs) > 1]


class GenevalMetric(Metric):
    """GenEval accuracy and the image guards as sums over images: `update` on each process's share, `compute`
    adds them over processes (torchmetrics syncs the states), so a sharded evaluation equals a single one."""

    full_state_update = False

    def __init__(self, tags: list[str], scorer=verify):
        super().__init__()
        self.tags, self.scorer = list(tags), scorer
        n, k = len(self.tags), len(REQUIREMENT_KINDS)
        for name, shape in (("passed", (n,)), ("count", (n,)), ("spare", (n,)), ("failed", (n, k)),
                            ("count_err", (len(COUNT_ERRORS),)), ("totals", (6,))):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: list[np.ndarray], entries: list[dict]) -> None:
        verdicts = (self.scorer.score_batch(images, entries) if hasattr(self.scorer, "score_batch")
                    else [self.scorer(img, e) for img, e in zip(images, entries)])
        self.last_passed = [v.passed for v in verdicts]  # this update's pass/fail per image, for grids
        for img, e, v in zip(images, entries, verdicts):
            t = self.tags.index(e["tag"])
            self.passed[t] += v.passed
            self.count[t] += 1
            self.spare[t] += spare_objects(v.detections, e) > 0
            for kind in {r.kind for r in v.requirements if not r.ok}:
                self.failed[t, REQUIREMENT_KINDS.index(kind)] += 1
            if e["tag"] == "counting":
                item = e["include"][0]
                error = sum(d.shape == item["class"] for d in v.detections) - item["count"]
                self.count_err[COUNT_ERRORS.index(f"{max(-2, min(2, error)):+d}" if error else "0")] += 1
            self.totals += self.totals.new_tensor([1, v.malformed > 0, not v.detections, background_noise(img), 0, 0])
        dists = _diversities(images, entries)
        self.totals[4:] += self.totals.new_tensor([sum(dists), len(dists)])

    def compute(self) -> GenevalResult:
        seen = [i for i, t in enumerate(self.tags) if self.count[i] > 0]
        acc = {self.tags[i]: float(self.passed[i] / self.count[i]) for i in seen}
        # a pass is 0/1, so its standard deviation is sqrt(p (1 - p))
        se = {t: math.sqrt(p * (1 - p) / float(self.count[self.tags.index(t)])) for t, p in acc.items()}
        acc["overall"] = float(np.mean([acc[self.tags[i]] for i in seen]))
        # Tags are independent samples, so the overall's variance is the mean of their variances / n_tags.
        se["overall"] = float(math.sqrt(sum(s**2 for s in se.values())) / len(seen))
        failures = {self.tags[i]: {k: float(self.failed[i, j] / self.count[i]) for j, k in enumerate(REQUIREMENT_KINDS)
                                   if self.failed[i, j] > 0} for i in seen}
        n_count = float(self.count_err.sum())
        count_hist = {k: float(self.count_err[j] / n_count) for j, k in enumerate(COUNT_ERRORS)} if n_count else {}
        n, malformed, empty, noise, div_sum, div_n = self.totals.tolist()
        return GenevalResult(acc, se, {self.tags[i]: int(self.count[i]) for i in seen}, malformed / n, empty / n,
                             noise / n, div_sum / div_n if div_n else float("nan"),
                             {t: f for t, f in failures.items() if f}, count_hist,
                             {self.tags[i]: float(self.spare[i] / self.count[i]) for i in seen})


def grid_picks(entries: list[dict], per_tag: int = 8) -> list[int]:
    """Indices of the images a report's grid shows: the first ``per_tag`` of each tag, tag by tag."""
    picks = []
    for tag in ordered_tags(entries):
        picks += [i for i, e in enumerate(entries) if e["tag"] == tag][:per_tag]
    return picks


def score_images(images: list[np.ndarray], entries: list[dict], scorer=verify) -> GenevalResult:
    """Score images against their entries in one process; overall = mean of per-tag accuracies (GenEval).
    `scorer(image, entry)` returns a `Verdict`; a scorer with `score_batch(images, entries)` gets all images at once."""
    metric = GenevalMetric(ordered_tags(entries), scorer)
    metric.update(images, entries)
    result = metric.compute()
    result.grid = [(images[i], metric.last_passed[i], entries[i]["prompt"]) for i in grid_picks(entries)]
    return result


@torch.no_grad()
def evaluate(policy, entries: list[dict], *, images_per_prompt: int, num_steps: int, guidance: float,
             seed: int = 0, batch: int = 64, progress: bool = True, dist=None, scorer=None) -> GenevalResult:
    """Generate `images_per_prompt` ODE samples per entry and score them with `scorer` (default: the Shapes
    verifier, which needs Shapes metadata); with ``dist`` the batches are split over the processes
    (`flowgrpo.eval.sampling`: any number of processes gives the result of one)."""
    if scorer is None:
        check_shapes_metadata(entries)
        scorer = verify
    todo = [e for e in entries for _ in range(images_per_prompt)]
    metric = GenevalMetric(ordered_tags(entries), scorer).to(dist.device if dist is not None else "cpu")
    picks = set(grid_picks(todo))
    grid = []
    for rows, chunk, x in sharded_samples(policy, todo, images_per_prompt=images_per_prompt, num_steps=num_steps,
                                     guidance=guidance, seed=seed, batch=batch, progress=progress, dist=dist):
        images = to_uint8(x)
        metric.update(images, chunk)
        grid += [(i, images[i - rows.start], metric.last_passed[i - rows.start], todo[i]["prompt"])
                 for i in range(rows.start, rows.stop) if i in picks]
    result = metric.compute()
    if dist is not None:
        grid = dist.gather_objects(grid)
    result.grid = [(img, ok, prompt) for _, img, ok, prompt in sorted(grid, key=lambda t: t[0])]
    return result


def markdown_table(results: dict[str, dict]) -> str:
    """Rows: one per `GenevalResult.summary()` (e.g. base, trained); columns: overall, tags, quality guards."""
    tags = ordered_tags([{"tag": t} for r in results.values() for t in r["accuracy"] if t != "overall"])
    head = "| model | overall | " + " | ".join(tags) + " | malformed | empty | bg noise | diversity |"
    sep = "|" + "---|" * (len(tags) + 6)
    lines = [head, sep]
    for name, r in results.items():
        cells = [f"{100 * r['accuracy'][t]:.1f} ± {100 * r['stderr'][t]:.1f}" for t in ["overall"] + tags]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {100 * r['malformed']:.1f}% | {100 * r['empty']:.1f}% | {r['background_noise']:.2f}"
                     f" | {r.get('diversity', float('nan')):.1f} |")
    return "\n".join(lines)


def failure_table(results: dict[str, dict]) -> str:
    """Why images fail: per model and tag, the percentage of images failing each requirement kind (an image
    can fail several). "quality" = a malformed object; "presence" = a required object not found. The last
    column, images with spare objects, is not a failure outside counting prompts ("–" in older results)."""
    lines = ["| model | tag | " + " | ".join(REQUIREMENT_KINDS) + " | spare objects |",
             "|" + "---|" * (len(REQUIREMENT_KINDS) + 3)]
    for name, r in results.items():
        for tag in ordered_tags([{"tag": t} for t in r["accuracy"] if t != "overall"]):
            fails = r["failures"].get(tag, {})  # a tag without failures has no entry
            cells = [f"{100 * fails.get(k, 0.0):.0f}%" for k in REQUIREMENT_KINDS]
            spare = r.get("spares", {}).get(tag)
            cells.append("–" if spare is None else f"{100 * spare:.0f}%")
            lines.append(f"| {name} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def count_error_table(results: dict[str, dict]) -> str:
    """Counting prompts: % of images drawing that many more (+) or fewer (-) objects of the asked class than asked;
    "+2" / "-2" include larger errors. Shows whether a model over- or under-draws, which accuracy alone hides."""
    lines = ["| model | " + " | ".join(COUNT_ERRORS) + " |", "|" + "---|" * (len(COUNT_ERRORS) + 1)]
    for name, r in results.items():
        if r.get("count_errors"):  # absent in results written before the table existed
            lines.append(f"| {name} | " + " | ".join(f"{100 * r['count_errors'][k]:.1f}%" for k in COUNT_ERRORS) + " |")
    return "\n".join(lines)


def report_markdown(results: dict[str, dict]) -> str:
    """The accuracy table, the failed-requirements table and, with counting prompts, the count-error table of
    `GenevalResult.summary()`s."""
    text = markdown_table(results) + "\n\nFailed requirements (% of images):\n\n" + failure_table(results) + "\n"
    if any(r.get("count_errors") for r in results.values()):
        text += "\nCounting prompts, objects of the asked class drawn minus asked (% of images):\n\n"
        text += count_error_table(results) + "\n"
    return text


def write_report(result: GenevalResult, out: str | Path, *, name: str = "model", grid_per_tag: int = 8) -> Path:
    """results.json, report.md and grid.png (rows = tags, each image captioned with its prompt, green/red borders =
    pass/fail)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.summary(), indent=1))
    (out / "report.md").write_text(report_markdown({name: result.summary()}))
    grid = result.grid_image(grid_per_tag)
    if grid is not None:
        grid.save(out / "grid.png")
    return out
