"""One process with 2 threads vs 2 processes with 1 thread each, for the same global batch of the `shapes` preset:
seconds per iteration and what each process puts into collectives per iteration (to project to more processes).

    HF_HUB_OFFLINE=1 python benchmarks/processes.py --rounds 3 --iterations 4 \
        --out benchmarks/results/multiprocess.json

Each round runs the two settings one after the other (1 process first), each a fresh run of the trainer
(`Trainer.step` on the preset's prompts) with a warm-up iteration; the settings alternate so a drift of the
machine's speed touches both. Traffic is counted in the trainer's collectives (reward, mask and image gathers,
metric reductions) and, through a DDP communication hook, in the gradient all-reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch


def worker(iterations: int, out: Path) -> None:
    """Time `iterations` iterations (after one warm-up) of the preset in this process group; rank 0 writes JSON."""
    from flowgrpo.config import make_config
    from flowgrpo.distributed import Dist
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.train import build_trainer, draw_prompts

    cfg = replace(make_config("shapes"), out=tempfile.mkdtemp(), log_with="")
    dist = Dist.create()
    trainer = build_trainer(cfg, dist)
    if dist.world_size > 1:  # count the gradient all-reduce: DDP hands its buckets to this hook
        def counting_allreduce(state, bucket):
            dist.traffic["gradients"] += bucket.buffer().numel() * bucket.buffer().element_size()
            tensor = bucket.buffer().div_(dist.world_size)
            return torch.distributed.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        trainer.module.register_comm_hook(None, counting_allreduce)
    entries = load_prompts(cfg.prompts)
    seconds, traffic = [], []
    for i in range(iterations + 1):
        dist.traffic.clear()
        metrics = trainer.step(draw_prompts(entries, cfg, i))
        if i:  # the first iteration warms up
            seconds.append(metrics["seconds_per_iter"])
            traffic.append(dict(dist.traffic))
    if dist.is_main:
        out.write_text(json.dumps({"processes": dist.world_size, "threads": torch.get_num_threads(),
                                   "seconds": seconds, "traffic": traffic}))


def run(processes: int, iterations: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // processes), HF_HUB_OFFLINE="1")
    script = [str(Path(__file__).resolve()), "--worker", "--iterations", str(iterations), "--out", str(out)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [sys.executable])
    subprocess.run(launch + script, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both settings")
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations per run (after a warm-up)")
    ap.add_argument("--out", type=Path, help="write the raw figures as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.iterations, args.out)
        return
    tmp = Path(tempfile.mkdtemp())
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for processes in (1, 2):
            runs[processes].append(run(processes, args.iterations, tmp / f"{processes}-{r}.json"))
            print(f"round {r}: {processes} process(es): median "
                  f"{statistics.median(runs[processes][-1]['seconds']):.2f} s/iteration", flush=True)
    median = {p: statistics.median([s for run_ in rs for s in run_["seconds"]]) for p, rs in runs.items()}
    traffic = {k: statistics.median([t[k] for run_ in runs[2] for t in run_["traffic"]])
               for k in runs[2][0]["traffic"][0]}
    print(f"1 process x 2 threads: {median[1]:.2f} s/iteration; 2 processes x 1 thread: {median[2]:.2f} s/iteration "
          f"({median[2] / median[1]:.2f}x)")
    print("bytes each process puts into collectives per iteration: " +
          ", ".join(f"{k} {v:,.0f}" for k, v in sorted(traffic.items())))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"median_seconds": median, "ratio": median[2] / median[1],
                                        "traffic_bytes_per_process": traffic, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
