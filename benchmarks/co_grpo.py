"""Co-GRPO on the Shapes world: the base masked diffusion model vs model-only, schedule-only and joint training at
equal wall-clock, each final model re-evaluated on fresh images.

    # 1. how many iterations each mode runs in 15 minutes alone on this machine (2 threads, nothing else running)
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/co_grpo.py measure --iterations 6 --out runs/co_grpo
    # 2. the race: each mode for its measured iterations (a budget in work, so a busy machine does not change the
    #    result), seeds 0 and 1, two runs at a time on one thread each; then every final model and the base model
    #    re-evaluated on 300 test entries x 4 images with evaluation seed 4321, the report and the schedule plot
    HF_HUB_OFFLINE=1 python benchmarks/co_grpo.py race --budget model=N1,schedule=N2,joint=N3 --seeds 0 1 \
        --out runs/co_grpo --results benchmarks/results/co_grpo/race

`race` skips runs already finished (their `summary.json`), so a stopped race resumes, and quotes the seconds per
iteration of `--measured` (the committed `benchmarks/results/co_grpo/measured.json` unless given), since its own
runs share the machine. Writes `{results}.md`, `{results}.json` and `{results}_schedule.png` (each learned schedule
against the default, step by step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

MODES = ("model", "schedule", "joint")
EVAL_SEED = 4321


def train_command(out: Path, mode: str, seed: int, iterations: int, eval_file: Path) -> list[str]:
    """`flowgrpo train` of the preset in one mode; its own evaluations only on a few entries (the race re-evaluates)."""
    return [sys.executable, "-m", "flowgrpo.cli", "train", "--preset", "shapes-mdm", "--co-mode", mode,
            "--seed", str(seed), "--iterations", str(iterations), "--eval-every", str(iterations), "--out", str(out),
            "--eval-prompts", str(eval_file), "--eval-images-per-prompt", "1", "--log-with", "",
            "--save-every", "10"]  # a stopped race loses little


def small_eval_file(out: Path) -> Path:
    from flowgrpo.prompts.shapes import load_split

    path = out / "eval_small.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::25]))
    return path


def seconds_per_iteration(run: Path) -> float:
    """Median training seconds per iteration of a run, its first (warm-up) iteration left out."""
    ckpts = sorted((run / "checkpoints").glob("iter-*"))
    history = json.loads((ckpts[-1] / "state.json").read_text())["history"]["train"]
    return statistics.median(h["seconds_per_iter"] for h in history[1:])


def run_all(commands: list[tuple[Path, list[str]]], parallel: int) -> None:
    """Run the commands, ``parallel`` at a time, one thread each when several run together."""
    threads = "1" if parallel > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    env = dict(os.environ, OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            out, cmd = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.log", "a")
            print(f"[{time.strftime('%H:%M:%S')}] start {out}", flush=True)
            running.append((out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for out, proc in list(running):
            if proc.poll() is not None:
                running.remove((out, proc))
                if proc.returncode:
                    raise RuntimeError(f"{out} failed (exit {proc.returncode}); see {out / 'train.log'}")
                print(f"[{time.strftime('%H:%M:%S')}] done {out}", flush=True)


def measure(args) -> None:
    """Time ``--iterations`` iterations of each mode, one run at a time, and print the 15-minute budgets."""
    eval_file = small_eval_file(args.out)
    found = {}
    for mode in MODES:
        out = args.out / f"measure-{mode}"
        run_all([(out, train_command(out, mode, 100, args.iterations, eval_file))], parallel=1)
        found[mode] = seconds_per_iteration(out)
    budget = {m: int(args.minutes * 60 / s) for m, s in found.items()}
    (args.out / "measured.json").write_text(json.dumps({"seconds_per_iteration": found, "budget": budget}, indent=1))
    print(json.dumps({"seconds_per_iteration": found, "budget": budget}))
    print("--budget " + ",".join(f"{m}={n}" for m, n in budget.items()))


def race(args) -> None:
    from flowgrpo.assets import SHAPES_MDM

    budget = {k: int(v) for k, v in (kv.split("=") for kv in args.budget.split(","))}
    eval_file = small_eval_file(args.out)
    runs = {f"{m}-s{s}": args.out / f"{m}-s{s}" for s in args.seeds for m in MODES}
    todo = [(runs[f"{m}-s{s}"], train_command(runs[f"{m}-s{s}"], m, s, budget[m], eval_file))
            for s in args.seeds for m in MODES if not (runs[f"{m}-s{s}"] / "summary.json").is_file()]
    run_all(todo, args.parallel)
    models = {"base": SHAPES_MDM} | {name: run / "final" for name, run in runs.items()}
    results = reevaluate(models, args.out / "reeval.json", args.images_per_prompt)
    # the runs share the machine, so their own timings say nothing: seconds per iteration come from `measure`
    speed = json.loads(args.measured.read_text())["seconds_per_iteration"]
    report(results, speed, budget, args)
    plot_schedules({name: run / "final" for name, run in runs.items() if not name.startswith("model")},
                   Path(f"{args.results}_schedule.png"))


def reevaluate(models: dict[str, Path], cache: Path, images_per_prompt: int) -> dict:
    """GenEval accuracy of every model on the test split with the fresh evaluation seed (cached per model)."""
    from flowgrpo.eval.geneval import evaluate
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.policies.generator import load_policy_for_sampling

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    entries = load_prompts("shapes:test")
    for name, path in models.items():
        if name not in done:
            policy = load_policy_for_sampling(str(path), batch=48, device="cpu")
            done[name] = evaluate(policy, entries, images_per_prompt=images_per_prompt, num_steps=None, guidance=None,
                                  seed=EVAL_SEED, batch=48).summary()
            cache.write_text(json.dumps(done, indent=1))
            print(name, f"{100 * done[name]['accuracy']['overall']:.1f}", flush=True)
    return done


def report(results: dict, speed: dict, budget: dict, args) -> None:
    from flowgrpo.eval.geneval import markdown_table

    tags = [t for t in results["base"]["accuracy"] if t != "overall"]
    lines = ["| mode | iterations | s/iteration alone | overall | " + " | ".join(tags) + " |",
             "|---|---|---|---|" + "---|" * len(tags)]
    for mode in ("base",) + MODES:
        names = ["base"] if mode == "base" else [f"{mode}-s{s}" for s in args.seeds]
        cells = []
        for t in ["overall"] + tags:  # mean over seeds; independent evaluations: se = sqrt(sum se^2) / n
            acc = statistics.mean(results[n]["accuracy"][t] for n in names)
            se = sum(results[n]["stderr"][t] ** 2 for n in names) ** 0.5 / len(names)
            cells.append(f"{100 * acc:.1f} ± {100 * se:.1f}")
        its = "0" if mode == "base" else str(budget[mode])
        sec = "–" if mode == "base" else f"{speed[mode]:.2f}"
        lines.append(f"| {mode} | {its} | {sec} | " + " | ".join(cells) + " |")
    text = ("Mean over seeds " + ", ".join(map(str, args.seeds)) + ":\n\n" + "\n".join(lines) +
            "\n\nEvery run:\n\n" + markdown_table(results) + "\n")
    Path(f"{args.results}.md").write_text(text)
    Path(f"{args.results}.json").write_text(json.dumps({"budget": budget, "seconds_per_iteration": speed,
                                                        "eval_seed": EVAL_SEED, "results": results}, indent=1))
    print(text)


def plot_schedules(finals: dict[str, Path], path: Path, size=(360, 260)) -> None:
    """Four panels (masked fraction left after each step, sampling temperature, remasking temperature, CFG scale):
    the default schedule (black) and each run's learned schedule at its means."""
    import torch

    from flowgrpo.assets import SHAPES_MDM
    from flowgrpo.policies.schedule import SchedulePolicy

    schedules = {"default": SchedulePolicy.from_pretrained(SHAPES_MDM / "schedule")}
    schedules |= {name: SchedulePolicy.from_pretrained(p / "schedule") for name, p in finals.items()}
    colours = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    base = schedules["default"]
    panels = [("masked fraction after step", 1.0), ("sampling temperature", float(base._high[1])),
              ("remasking temperature", float(base._high[2])), ("CFG scale", float(base._high[3]))]
    img = Image.new("RGB", (2 * size[0], 2 * size[1]), "white")
    for k, (title, top_value) in enumerate(panels):
        ox, oy = (k % 2) * size[0], (k // 2) * size[1]
        d = ImageDraw.Draw(img)
        left, right, top, bottom = 40, 10, 24, 24
        w, h = size
        d.rectangle([ox + left, oy + top, ox + w - right, oy + h - bottom], outline="black")
        d.text((ox + left, oy + 6), f"{title} (0 - {top_value:g})", fill="black")
        for n, (name, sched) in enumerate(schedules.items()):
            values = sched.mean_schedule().detach()
            ys = torch.cumprod(1 - values[:, 0], 0) if k == 0 else values[:, k]
            steps = len(ys) - (1 if k == 2 else 0)  # the last step's remasking does nothing
            pts = [(ox + left + i / max(len(ys) - 1, 1) * (w - left - right),
                    oy + h - bottom - float(ys[i]) / top_value * (h - top - bottom)) for i in range(steps)]
            d.line(pts, fill=colours[n % len(colours)], width=2)
            if k == 0:
                d.text((ox + w - right - 120, oy + top + 6 + 12 * n), name, fill=colours[n % len(colours)])
        d.text((ox + left, oy + h - bottom + 6), "step 1", fill="black")
        d.text((ox + w - right - 50, oy + h - bottom + 6), f"step {len(ys)}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--iterations", type=int, default=6)
    m.add_argument("--minutes", type=float, default=15.0)
    r = sub.add_parser("race")
    r.add_argument("--budget", required=True, help="iterations per mode, e.g. model=60,schedule=200,joint=55")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each when > 1)")
    r.add_argument("--images-per-prompt", type=int, default=4)
    r.add_argument("--measured", type=Path, default=Path("benchmarks/results/co_grpo/measured.json"),
                   help="the `measure` output whose seconds per iteration (alone, 2 threads) the report quotes")
    r.add_argument("--results", default="benchmarks/results/co_grpo/race",
                   help="path prefix of the report: PREFIX.md, PREFIX.json, PREFIX_schedule.png")
    for p in (m, r):
        p.add_argument("--out", type=Path, default=Path("runs/co_grpo"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    measure(args) if args.command == "measure" else race(args)


if __name__ == "__main__":
    main()
