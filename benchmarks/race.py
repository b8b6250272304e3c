"""The race of the rollout strategies on the Shapes world at equal compute, every final model re-evaluated on fresh
noise. Resumable: rerun the same command and finished parts are kept.

    HF_HUB_OFFLINE=1 python benchmarks/race.py --seeds 0 1 2 --minutes 25 --timing-threads 1 --parallel 2 \
        --out benchmarks/results/race
    # the forward-process race: chosen runs, cheap in-run evaluations, re-evaluation at CFG 4.5 and CFG-free
    HF_HUB_OFFLINE=1 python benchmarks/race.py --runs g2rpo:0 g2rpo_guard:0 diffusion_nft:0 awm:0 \
        --run-eval-images 1 --guidances 4.5 1 --out runs/race_fwd

1. Timing on ``--timing-threads`` threads: each strategy's seconds per iteration (median of 3 after a warm-up).
2. Training: `flowgrpo train --preset shapes` with each strategy for the iterations its seconds per iteration allow
   in ``--minutes`` (a budget in work, so runs sharing the machine, ``--parallel`` at a time on one thread each,
   train exactly what a run alone would), evaluating at a third, two thirds and the end. On one thread the preset's
   iteration takes about 1.65 times as long as on 2 threads, so 25 single-thread minutes are about 15 minutes alone
   on the 2 cores.
3. Re-evaluation of every final model and the base model on the Shapes test split with fresh noise (``--n`` images
   per entry: 1200 at 4) at each of ``--guidances``, then per strategy the mean and standard error over seeds, and a
   plot of held-out accuracy against training minutes.
4. Memory: each strategy's peak resident memory above its loaded state during one iteration (memory.json).

Strategies share the preset (Pref-GRPO win rates from the verifier, KL, learning rate, 10 sampling steps) and differ
in how they explore and what they train (``STRATEGIES`` below, each with its paper's noise where it differs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "flow_grpo": {"strategy": "flow_grpo", "sde_steps": 0, "noise_level": 0.7},  # Flow-GRPO: a = 0.7, every step
    "dance_grpo": {"strategy": "dance_grpo", "sde_steps": 0, "sde_kind": "dance_sde", "noise_level": 0.3},  # eta = 0.3
    # a whole window of 2 of 10 steps moving through the first 6 (the first race's setting; the default now follows
    # MixGRPO's code: steps before num_steps - 2, truncated at the end)
    "mixgrpo": {"strategy": "mixgrpo", "sde_steps": 2, "mixgrpo.window_end": 6, "mixgrpo.whole_window": True},
    "g2rpo": {"strategy": "g2rpo"},  # the preset
    "dense_grpo": {"strategy": "dense_grpo"},  # SDE on the first 3 steps, a calibrated noise scale per step
    "g2rpo_guard": {"strategy": "g2rpo", "grpo_guard": True},  # the preset with GRPO-Guard's normalised ratio
    "diffusion_nft": {"strategy": "diffusion_nft"},  # DPM-Solver++ rollouts, the forward process trained
    "awm": {"strategy": "awm"},  # Euler rollouts, advantage-weighted flow matching
}


def config_of(name: str, seed: int, out: str):
    from flowgrpo.config import make_config

    return make_config("shapes", overrides={**STRATEGIES[name], "seed": seed, "out": out, "log_with": ""})


def seconds_per_iteration(name: str) -> float:
    """Median seconds of 3 trainer iterations after a warm-up, in this process."""
    from flowgrpo.distributed import Dist
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.train import build_trainer, draw_prompts

    cfg = config_of(name, 0, tempfile.mkdtemp())
    trainer = build_trainer(cfg, Dist.create())
    entries = load_prompts(cfg.prompts)
    times = [trainer.step(draw_prompts(entries, cfg, i))["seconds_per_iter"] for i in range(4)]
    return statistics.median(times[1:])


def peak_iteration_memory(name: str) -> dict:
    """Peak resident memory above the loaded trainer during its first iteration (sampled every 5 ms; the allocator
    keeps what it took, so a later iteration would show none), in MiB, and per sample of the iteration."""
    import threading

    from flowgrpo.distributed import Dist
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.train import build_trainer, draw_prompts

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cfg = config_of(name, 0, tempfile.mkdtemp())
    trainer = build_trainer(cfg, Dist.create())
    entries = load_prompts(cfg.prompts)
    start, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    trainer.step(draw_prompts(entries, cfg, 0))
    done.set()
    watcher.join()
    samples = cfg.prompts_per_iter * cfg.group_size
    return {"peak_mib": (peak[0] - start) / 2**20, "per_sample_mib": (peak[0] - start) / 2**20 / samples,
            "micro_batch": cfg.micro_batch, "samples": samples}


def train_command(name: str, seed: int, iterations: int, out: Path, eval_images: int) -> list[str]:
    extra = dict(STRATEGIES[name])
    if name == "mixgrpo":  # the window visits each of its 5 positions once over the run
        extra["mixgrpo.window_shift_every"] = max(1, iterations // 5)
    args = [sys.executable, "-m", "flowgrpo.cli", "train", "--preset", "shapes", "--seed", str(seed),
            "--iterations", str(iterations), "--max-minutes", "0", "--eval-every", str(math.ceil(iterations / 3)),
            "--out", str(out), "--log-with", "", "--eval-images-per-prompt", str(eval_images)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run the commands ``parallel`` at a time, one thread each; a finished one (summary.json) is skipped."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if parallel > 1 else "2", HF_HUB_OFFLINE="1")
    pending = [(cmd, out) for cmd, out in jobs if not (out / "summary.json").is_file()]
    running: list[tuple[subprocess.Popen, Path, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, out = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.log", "a")
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out, time.time()))
        time.sleep(5)
        for proc, out, t0 in list(running):
            if proc.poll() is not None:
                running.remove((proc, out, t0))
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"{out.name}: {status} in {(time.time() - t0) / 60:.1f} min", flush=True)


def reevaluate(models: dict[str, Path], out: Path, n: int, seed: int, guidances: list[float]) -> dict:
    """GenEval summaries of each model on fresh noise (``seed``) at each CFG scale, one process; cached in ``out``
    (key NAME at the first scale, NAME@cfgG at the others), evaluating only what is missing."""
    from flowgrpo.eval.geneval import evaluate
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.policies.generator import load_policy_for_sampling

    results = json.loads(out.read_text()) if out.is_file() else {}
    entries = load_prompts("shapes:test")
    for name, path in models.items():
        for k, g in enumerate(guidances):
            key = name if k == 0 else f"{name}@cfg{g:g}"
            if key not in results:
                results[key] = evaluate(load_policy_for_sampling(str(path), batch=64), entries, images_per_prompt=n,
                                        num_steps=20, guidance=g, seed=seed).summary()
                out.write_text(json.dumps(results, indent=1))
    return results


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def summarise(args, timing: dict, fresh: dict, runs: dict, memory: dict) -> str:
    from flowgrpo.eval.plots import line_plot
    from flowgrpo.shapes.world import TAGS

    others = [f"@cfg{g:g}" for g in args.guidances[1:]]
    lines = ["| strategy | s / iteration | iterations | seeds | overall | gain | "
             + "".join(f"overall at CFG {g:g} | gain at CFG {g:g} | " for g in args.guidances[1:])
             + "two_object + position gain | " + " | ".join(TAGS) + " | spare objects | malformed | update memory / sample |",
             "|---" * (11 + 2 * len(others) + len(TAGS)) + "|"]
    b0 = fresh["base"]
    lines.append(f"| base | – | 0 | – | {100 * b0['accuracy']['overall']:.1f} ± {100 * b0['stderr']['overall']:.1f} | – | "
                 + "".join(f"{100 * fresh['base' + o]['accuracy']['overall']:.1f} | – | " for o in others) + "– | "
                 + " | ".join(f"{100 * b0['accuracy'][t]:.1f}" for t in TAGS) +
                 f" | {100 * statistics.mean(b0['spares'].values()):.1f}% | {100 * b0['malformed']:.1f}% | – |")
    composition = ("two_object", "position")
    curves, table = {}, {}
    for name, seeds in runs.items():
        seeds = [s for s in seeds if f"{name}-seed{s}" in fresh]
        if not seeds:
            continue
        res = [fresh[f"{name}-seed{s}"] for s in seeds]
        overall = mean_se([100 * r["accuracy"]["overall"] for r in res])
        gain = mean_se([100 * (r["accuracy"]["overall"] - b0["accuracy"]["overall"]) for r in res])
        at = {o: (mean_se([100 * fresh[f"{name}-seed{s}{o}"]["accuracy"]["overall"] for s in seeds]),
                  mean_se([100 * (fresh[f"{name}-seed{s}{o}"]["accuracy"]["overall"]
                                  - fresh["base" + o]["accuracy"]["overall"]) for s in seeds])) for o in others}
        tags = [mean_se([100 * r["accuracy"][t] for r in res]) for t in TAGS]
        compo = mean_se([100 * sum(r["accuracy"][t] - b0["accuracy"][t] for t in composition) for r in res])
        spares = statistics.mean(statistics.mean(r["spares"].values()) for r in res)
        malformed = statistics.mean(r["malformed"] for r in res)
        mem = memory.get(name, {}).get("per_sample_mib", math.nan)
        table[name] = {"overall": overall, "gain": gain, "composition_gain": compo, "tags": dict(zip(TAGS, tags)),
                       "spares": spares, "malformed": malformed, "seconds_per_iteration": timing[name], "seeds": seeds,
                       "iterations": iterations(args, timing, name), "at_guidance": at, "memory": memory.get(name),
                       "gains_per_seed": [100 * (r["accuracy"]["overall"] - b0["accuracy"]["overall"]) for r in res]}
        lines.append(f"| {name} | {timing[name]:.2f} | {iterations(args, timing, name)} | {','.join(map(str, seeds))} | "
                     f"{overall[0]:.1f} ± {overall[1]:.1f} | {gain[0]:+.1f} ± {gain[1]:.1f} | "
                     + "".join(f"{a[0]:.1f} ± {a[1]:.1f} | {g[0]:+.1f} ± {g[1]:.1f} | " for a, g in at.values())
                     + f"{compo[0]:+.1f} ± {compo[1]:.1f} | " + " | ".join(f"{m:.1f} ± {e:.1f}" for m, e in tags) +
                     f" | {100 * spares:.1f}% | {100 * malformed:.1f}% | {mem:.1f} MiB |")
        history = [json.loads(max((args.out / f"{name}-seed{s}" / "checkpoints").glob("iter-*/state.json"),
                                  key=lambda p: p.parent.name).read_text())["history"]["eval"] for s in seeds]
        its = [e["iteration"] for e in history[0]]
        acc = [statistics.mean(100 * h[k]["accuracy"]["overall"] for h in history) for k in range(len(its))]
        curves[name] = ([it * timing[name] / 60 for it in its], acc)
        table[name]["curve"] = {"minutes": curves[name][0], "overall": acc}
    line_plot(curves, args.out / "accuracy_vs_minutes.png",
              title="Shapes test accuracy during training (mean over each strategy's seeds; the runs' own eval noise)",
              xlabel="training minutes (of the timing)", ylabel="overall %")
    (args.out / "race.json").write_text(json.dumps({"timing": timing, "base_fresh": b0, "strategies": table},
                                                   indent=1))
    return f"base (fresh noise): {100 * b0['accuracy']['overall']:.1f}\n\n" + "\n".join(lines) + "\n"


def iterations(args, timing: dict, name: str) -> int:
    return max(1, round(60 * args.minutes / timing[name]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=None, metavar="STRATEGY:SEED",
                    help="the runs to make instead of every strategy at every seed")
    ap.add_argument("--minutes", type=float, default=25.0, help="training budget of each run, in minutes of the timing")
    ap.add_argument("--timing-threads", type=int, default=1, help="threads of the timing runs")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each when > 1)")
    ap.add_argument("--run-eval-images", type=int, default=4, help="images per test entry of the runs' own evaluations")
    ap.add_argument("--n", type=int, default=4, help="images per test entry in the re-evaluation (300 entries)")
    ap.add_argument("--guidances", nargs="+", type=float, default=[4.5], help="CFG scales of the re-evaluation")
    ap.add_argument("--eval-seed", type=int, default=4321, help="noise of the re-evaluation (fresh: no run uses it)")
    ap.add_argument("--eval-threads", type=int, default=2, help="threads of the re-evaluation")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = ([(r.split(":")[0], int(r.split(":")[1])) for r in args.runs] if args.runs else
             [(name, s) for s in args.seeds for name in args.strategies])
    unknown = sorted({n for n, _ in pairs} - set(STRATEGIES))
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose among {list(STRATEGIES)}")
    runs: dict[str, list[int]] = {}
    for name, seed in pairs:
        runs.setdefault(name, []).append(seed)
    import torch

    torch.set_num_threads(args.timing_threads)
    timing_file, memory_file = args.out / "timing.json", args.out / "memory.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
    for name in runs:
        if name not in timing:
            timing[name] = seconds_per_iteration(name)
            timing_file.write_text(json.dumps(timing, indent=1))
            print(f"{name}: {timing[name]:.2f} s per iteration on {args.timing_threads} thread(s)", flush=True)
    run_all([(train_command(name, s, iterations(args, timing, name), args.out / f"{name}-seed{s}",
                            args.run_eval_images), args.out / f"{name}-seed{s}") for name, s in pairs], args.parallel)
    from flowgrpo.assets import SHAPES_MODEL

    torch.set_num_threads(args.eval_threads)
    models = {"base": SHAPES_MODEL}  # the fresh noise does not depend on the run: one base evaluation serves all
    models.update({f"{name}-seed{s}": args.out / f"{name}-seed{s}" / "final" for name, s in pairs})
    fresh = reevaluate(models, args.out / "fresh_eval.json", args.n, args.eval_seed, args.guidances)
    torch.set_num_threads(args.timing_threads)
    for name in runs:
        if name not in memory:
            memory[name] = peak_iteration_memory(name)
            memory_file.write_text(json.dumps(memory, indent=1))
    report = summarise(args, {k: timing[k] for k in runs}, fresh, runs, memory)
    (args.out / "race.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
