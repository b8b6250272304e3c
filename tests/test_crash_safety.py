"""SIGKILL at any instant — several of them inside a checkpoint save — never loses more than the work since the last
complete checkpoint and never leaves a run that cannot resume: killed 10 times and rerun each time, a training run
ends with bit-identical parameters to a run that was never interrupted (CPU, fp32), for the flow and the LLM trainer."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from flowgrpo.checkpoint import CheckpointDir, read_training
from tests.tiny_llm import build_tiny_causal_lm
from flowgrpo.prompts.shapes import load_split

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _checkpoints(run) -> CheckpointDir:
    return CheckpointDir(run / "checkpoints")


def _kill_when(proc: subprocess.Popen, ready, deadline: float) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every millisecond); False if it ended first."""
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    return False


def crash_and_resume(cmd: list[str], run, kind: str, kills: int, seed: int, cwd) -> dict:
    """Start ``cmd`` and SIGKILL it ``kills`` times — every other time while a checkpoint is being written, else at a
    random instant — rerunning it after each kill; then let it finish. Returns how the kills landed."""
    rng = random.Random(seed)
    landed = {"in_save": 0, "elsewhere": 0}
    for k in range(kills):
        proc = subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if k % 2 == 0:  # inside a save: the temporary directory exists only between mkdir and the final rename
            killed = _kill_when(proc, lambda: any(run.glob("checkpoints/iter-*.tmp")), time.monotonic() + 120)
            if killed and any(run.glob("checkpoints/iter-*.tmp")):
                landed["in_save"] += 1
        else:
            delay = rng.uniform(0.5, 9.0)
            killed = _kill_when(proc, lambda: False, time.monotonic() + delay)
            landed["elsewhere"] += killed
        if not killed:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break
        newest = _checkpoints(run).newest()
        if newest is not None:  # whatever was killed, the newest complete checkpoint reads back
            read_training(newest, kind=kind)
    done = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return landed


def _same_final_weights(a, b, iteration: int, files=("weights.safetensors", "optimizer.pt")) -> None:
    for f in files:
        pa, pb = (run / "checkpoints" / f"iter-{iteration:06d}" / f for run in (a, b))
        if f.endswith(".pt"):  # torch.save stamps every file with a random serialization id: compare the contents
            assert _flat(torch.load(pa, weights_only=True)) == _flat(torch.load(pb, weights_only=True)), f
        else:
            assert pa.read_bytes() == pb.read_bytes(), f


def _flat(obj, prefix=""):
    """Nested dicts/lists of tensors and numbers as {path: bytes or value}, so == is bitwise."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}/{i}").items()}
    if isinstance(obj, torch.Tensor):
        return {prefix: (obj.dtype, tuple(obj.shape), obj.contiguous().view(-1).view(torch.uint8).numpy().tobytes())}
    return {prefix: obj}


def uninterrupted(cmd: list[str], cwd) -> subprocess.Popen:
    """The reference run, on the other core while the killed one runs."""
    return subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_flow_run_killed_ten_times_ends_as_if_never_interrupted(tmp_path):
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))

    def cmd(out):
        return [sys.executable, "-m", "flowgrpo.cli", "train", "--out", str(out), "--iterations", "10",
                "--prompts-per-iter", "2", "--group-size", "4", "--micro-batch", "8", "--num-steps", "3",
                "--sde-steps", "2", "--eval-prompts", str(evalf), "--eval-num-steps", "1",
                "--eval-images-per-prompt", "1", "--eval-every", "1000", "--save-every", "1", "--max-minutes", "0",
                "--lr", "1e-3", "--ema-decay", "0.9", "--log-with", ""]

    straight = uninterrupted(cmd(tmp_path / "straight"), tmp_path)
    landed = crash_and_resume(cmd(tmp_path / "killed"), tmp_path / "killed", "flow", kills=10, seed=0, cwd=tmp_path)
    finished(straight)
    assert landed["in_save"] >= 3, landed
    _same_final_weights(tmp_path / "straight", tmp_path / "killed", 10, ("weights.safetensors", "optimizer.pt",
                                                                        "ema.safetensors"))


LLM_SCRIPT = textwrap.dedent('''
    import sys
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from flowgrpo.llm import GRPO

    path, out = sys.argv[1], sys.argv[2]

    def distinct(prompts, completions, **_):
        return [len(set(c)) / 8 for c in completions]

    data = [{"prompt": p} for p in ["ab", "xyz", "hello", "q", "12+3", "zz", "k", "mn"]]
    trainer = GRPO(AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path), distinct,
                   group_size=4, prompts_per_iter=2, max_new_tokens=8, lr=1e-2, stop=tuple("aeiou"), advantage="spo",
                   out=out, save_every=1)
    trainer.train(data, iterations=300, progress=False)
''')


@pytest.mark.slow
def test_llm_run_killed_ten_times_ends_as_if_never_interrupted(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "tiny", seed=2)
    script = tmp_path / "llm_run.py"
    script.write_text(LLM_SCRIPT)

    def cmd(out):
        return [sys.executable, str(script), str(model), str(out)]

    straight = uninterrupted(cmd(tmp_path / "straight"), tmp_path)
    landed = crash_and_resume(cmd(tmp_path / "killed"), tmp_path / "killed", "llm", kills=10, seed=1, cwd=tmp_path)
    finished(straight)
    assert landed["in_save"] >= 3, landed
    _same_final_weights(tmp_path / "straight", tmp_path / "killed", 300)
