"""Compare `flowgrpo train` runs over their course: held-out accuracy, image-quality and diversity guards
at every evaluation, and the training reward, as a markdown table and curves.

    python benchmarks/compare_runs.py runs/shapes-grpo runs/shapes-pref --names pointwise pref-grpo \
        --out benchmarks/results/pref_vs_pointwise

Reward hacking shows as the training reward (or win rate) rising while held-out accuracy falls, or as
image diversity within a prompt collapsing. Reads each run's newest checkpoint (`checkpoints/iter-*/state.json`); writes
`{out}.md`, `{out}_accuracy.png` and `{out}_reward.png`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llm_common import moving_average, plot_curves

from flowgrpo.checkpoint import CheckpointDir


def load_history(run: Path) -> dict:
    newest = CheckpointDir(run / "checkpoints").newest()
    if newest is None:
        raise SystemExit(f"{run}: no complete checkpoint in {run / 'checkpoints'} (is it a flowgrpo train output directory?)")
    return json.loads((newest / "state.json").read_text())["history"]


def eval_rows(name: str, history: dict, train_window: int) -> list[str]:
    rewards = [h["reward_mean"] for h in history["train"]]
    rows = []
    for e in history["eval"]:
        it = e["iteration"]
        recent = rewards[max(0, it - train_window): it]
        reward = f"{sum(recent) / len(recent):.3f}" if recent else "–"
        acc, se = e["accuracy"], e["stderr"]
        rows.append(f"| {name} | {it} | {reward} | {100 * acc['overall']:.1f} ± {100 * se['overall']:.1f} | "
                    f"{100 * e['malformed']:.1f}% | {e['background_noise']:.2f} | {e.get('diversity', float('nan')):.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="flowgrpo train output directories")
    ap.add_argument("--names", nargs="+", help="one label per run (default: directory names)")
    ap.add_argument("--out", type=Path, required=True, help="output path prefix")
    ap.add_argument("--train-window", type=int, default=20, help="iterations averaged for the training reward")
    args = ap.parse_args()
    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        raise SystemExit(f"--names has {len(names)} labels for {len(args.runs)} runs")
    histories = {n: load_history(r) for n, r in zip(names, args.runs)}

    lines = [f"| run | iteration | train reward (last {args.train_window} it) | held-out overall | malformed | bg noise | "
             "diversity |",
             "|---|---|---|---|---|---|---|"]
    for n, h in histories.items():
        lines += eval_rows(n, h, args.train_window)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plot_curves({f"{n}: held-out overall": [e["accuracy"]["overall"] for e in h["eval"]] for n, h in histories.items()},
                Path(f"{args.out}_accuracy.png"), title="held-out accuracy at each evaluation")
    plot_curves({f"{n}: train reward": moving_average([t["reward_mean"] for t in h["train"]], args.train_window)
                 for n, h in histories.items()}, Path(f"{args.out}_reward.png"),
                title=f"training reward ({args.train_window}-iteration moving average)")


if __name__ == "__main__":
    main()
