"""GenEval-style evaluation: per-tag accuracy with standard errors, JSON + markdown report and an image grid with
pass/fail borders. Images are scored by the exact Shapes verifier, or by any scorer returning its `Verdict`
(`flowgrpo.eval.geneval_detector.GenevalScorer` for real GenEval classes)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowgrpo.eval.grid import FAIL, PASS, image_grid
from flowgrpo.rewards.shapes import to_uint8
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
    images: list[np.ndarray]
    entries: list[dict]
    passed: list[bool]

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "n_images": self.n_images,
                "malformed": self.malformed, "empty": self.empty, "background_noise": self.background_noise,
                "diversity": self.diversity, "failures": self.failures, "count_errors": self.count_errors,
                "spares": self.spares}


def check_shapes_metadata(entries: list[dict]) -> None:
    classes = {it["class"] for e in entries for it in e["include"] + e.get("exclude", [])}
    unknown = sorted(classes - set(W.SHAPES))
    if unknown:
        raise ValueError(f"the bundled verifier knows the Shapes classes {W.SHAPES} only; this metadata asks for "
                         f"{unknown[:5]}{'...' if len(unknown) > 5 else ''}. Real GenEval classes need a COCO detector "
                         "and CLIP: flowgrpo.eval.geneval_detector.GenevalScorer.")


def prompt_diversity(images: list[np.ndarray], entries: list[dict]) -> float:
    """Mean absolute pixel difference (0-255) between pairs of images made for the same entry, averaged over
    entries with at least two images; NaN when there are none. Mode collapse under a hacked reward lowers it."""
    by_prompt: dict[str, list[np.ndarray]] = defaultdict(list)
    for img, e in zip(images, entries):
        by_prompt[json.dumps(e, sort_keys=True)].append(img.astype(np.float32))
    dists = [np.mean([np.abs(a - b).mean() for i, a in enumerate(imgs) for b in imgs[i + 1:]])
             for imgs in by_prompt.values() if len(imgs) > 1]
    return float(np.mean(dists)) if dists else float("nan")


def score_images(images: list[np.ndarray], entries: list[dict], scorer=verify) -> GenevalResult:
    """Score images against their entries; overall = mean of per-tag accuracies (GenEval). `scorer(image, entry)`
    returns a `Verdict`; a scorer with `score_batch(images, entries)` gets all images at once."""
    passed, per_tag, spares = [], defaultdict(list), defaultdict(list)
    failed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    malformed = empty = 0
    noise, count_errors = [], []
    verdicts = (scorer.score_batch(images, entries) if hasattr(scorer, "score_batch")
                else [scorer(img, e) for img, e in zip(images, entries)])
    for img, e, v in zip(images, entries, verdicts):
        if e["tag"] == "counting":
            item = e["include"][0]
            count_errors.append(sum(d.shape == item["class"] for d in v.detections) - item["count"])
        passed.append(v.passed)
        per_tag[e["tag"]].append(v.passed)
        spares[e["tag"]].append(spare_objects(v.detections, e) > 0)
        for kind in {r.kind for r in v.requirements if not r.ok}:
            failed[e["tag"]][kind] += 1
        malformed += v.malformed > 0
        empty += not v.detections
        noise.append(background_noise(img))
    acc = {t: float(np.mean(p)) for t, p in per_tag.items()}
    se = {t: float(np.std(p) / math.sqrt(len(p))) for t, p in per_tag.items()}
    acc["overall"] = float(np.mean([acc[t] for t in per_tag]))
    # Tags are independent samples, so the overall's variance is the mean of their variances / n_tags.
    se["overall"] = float(math.sqrt(sum(s**2 for t, s in se.items() if t != "overall")) / len(per_tag))
    failures = {t: {k: n / len(per_tag[t]) for k, n in sorted(kinds.items())} for t, kinds in failed.items()}
    clipped = [f"{max(-2, min(2, d)):+d}" if d else "0" for d in count_errors]
    count_hist = {k: clipped.count(k) / len(clipped) for k in COUNT_ERRORS} if clipped else {}
    return GenevalResult(acc, se, {t: len(p) for t, p in per_tag.items()}, malformed / len(images),
                         empty / len(images), float(np.mean(noise)), prompt_diversity(images, entries), failures,
                         count_hist, {t: float(np.mean(s)) for t, s in spares.items()}, images, entries, passed)


@torch.no_grad()
def evaluate(policy, entries: list[dict], *, images_per_prompt: int, num_steps: int, guidance: float,
             seed: int = 0, batch: int = 64, progress: bool = True, scorer=None) -> GenevalResult:
    """Generate `images_per_prompt` ODE samples per entry (fixed seed) and score them with `scorer` (default: the
    Shapes verifier, which needs Shapes metadata)."""
    if scorer is None:
        check_shapes_metadata(entries)
    todo = [e for e in entries for _ in range(images_per_prompt)]
    g = torch.Generator().manual_seed(seed)
    images: list[np.ndarray] = []
    for s in tqdm(range(0, len(todo), batch), desc="eval", disable=not progress, leave=False):
        chunk = todo[s : s + batch]
        images += to_uint8(policy.generate([e["prompt"] for e in chunk], num_steps=num_steps, guidance=guidance,
                                           generator=g))
    return score_images(images, todo, scorer or verify)


def markdown_table(results: dict[str, dict]) -> str:
    """Rows: one per `GenevalResult.summary()` (e.g. base, trained); columns: overall, tags, quality guards."""
    tags = [t for t in W.TAGS if any(t in r["accuracy"] for r in results.values())]
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
        for tag in (t for t in W.TAGS if t in r["accuracy"]):
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
    """results.json, report.md and grid.png (rows = tags, green/red borders = pass/fail)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.summary(), indent=1))
    (out / "report.md").write_text(report_markdown({name: result.summary()}))
    picks = []
    for tag in W.TAGS:
        picks += [i for i, e in enumerate(result.entries) if e["tag"] == tag][:grid_per_tag]
    grid = image_grid([result.images[i] for i in picks], grid_per_tag,
                      borders=[PASS if result.passed[i] else FAIL for i in picks])
    grid.save(out / "grid.png")
    return out
