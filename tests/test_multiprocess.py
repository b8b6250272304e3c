"""Several processes (gloo on CPU, started by torchrun) train what one process trains: the flow trainer (the Shapes
preset's G²RPO + Pref-GRPO, DiffusionNFT and AWM, and Flow-GRPO sharded by FSDP2), Co-GRPO on the masked diffusion model and the LLM
trainer (DDP and FSDP2); a checkpoint written by 2 processes resumes on 1; every sample's noise is its own whatever
process draws it.

How runs are compared, so that the verdict is the code's and not the host's:
- what the processes compute before the optimizer touches it (the rollouts' rewards, the advantages' statistics,
  the clip fractions, the gradient norm) is compared directly, at fp32 tolerance;
- trained weights are compared under plain SGD (``--optim sgd``, momentum 0.9). Its step is linear in the gradient,
  so runs whose gradients differ only in summation order (1 vs 2 processes) differ by that rounding times lr, plus
  at most an ulp of each weight per step: ``same_training`` allows RTOL of how far training moved the weights plus
  one fp32 epsilon of each weight per iteration. A real world-size bug (a rank drawing another rank's noise, groups
  normalised per rank, a gradient that is not all-reduced, a checkpoint that drops the optimizer's or the tracker's
  state) changes the update itself, i.e. by order 1 of the move. Adam-trained weights would not do: Adam moves an
  entry by about lr whatever the size of its gradient, so a last-bit difference in a near-zero gradient becomes an
  lr-sized difference, and how often that happens depends on the host's kernels.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.config import TrainConfig
from tests.tiny_llm import build_tiny_causal_lm
from flowgrpo.prompts.shapes import load_split
from flowgrpo.settings import BatchLayout
from flowgrpo.strategies import initial_noise, sde_noise
from flowgrpo.trainer import Plan
from tests.helpers import single

RTOL = 1e-3  # of the weights' move: 1e4 x fp32's summation-order rounding of a gradient, 1e-3 x any real bug
# what the processes compute from the rollouts before the optimizer uses it; equal up to fp32 summation order
BEFORE_THE_OPTIMIZER = ("reward_mean", "reward_std", "adv/n_valid", "clip_frac")


def _run(args: list[str], processes: int, tmp_path) -> None:
    """Run ``python -m ...`` (or a script) on ``processes`` processes, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = launch + args if processes > 1 else [sys.executable] + args
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def same_training(a: dict, b: dict, start: dict, iterations: int) -> None:
    """Weights ``a`` and ``b``, trained from ``start`` by ``iterations`` SGD steps whose gradients differ only in
    summation order: |a - b| <= RTOL x max|a - start| + iterations x eps x |a|, entry by entry."""
    assert set(a) == set(b) and set(a) <= set(start)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 0, "training did not move the weights"
    eps = torch.finfo(torch.float32).eps
    worst = max(float(((a[k] - b[k]).abs() / (RTOL * moved + iterations * eps * a[k].abs())).max()) for k in a)
    assert worst <= 1, f"the runs differ by {worst:.3g} x the rounding bound (weights moved by {moved:.3g})"


def same_history(a: list[dict], b: list[dict], keys=BEFORE_THE_OPTIMIZER, grad_rel: float = 1e-5) -> None:
    """The iterations' statistics, and the norm of the first all-reduced gradient. (Later gradients depend on the
    weights' move, e.g. the KL term's on w - w_ref, which carries the weights' rounding at RTOL of the move.)"""
    for key in keys:
        assert [h[key] for h in a] == pytest.approx([h[key] for h in b], rel=1e-5, abs=1e-7), key
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=grad_rel)


def _checkpoint(run, it: int):
    return run / "checkpoints" / f"iter-{it:06d}"


def one_two_resumed(train, tmp_path, two: str = "two", resumed: str = "resumed") -> None:
    """Runs "one" (2 iterations on 1 process) and ``two`` (on 2), then ``resumed``: the 2-process run's first
    checkpoint continued on 1 process for the second iteration."""
    if not (tmp_path / "one").exists():
        train("one", 1)
    train(two, 2)
    shutil.copytree(_checkpoint(tmp_path / two, 1), _checkpoint(tmp_path / resumed, 1))
    train(resumed, 1)


def weights(tmp_path, run: str, it: int, name: str = "weights.safetensors") -> dict:
    return load_file(_checkpoint(tmp_path / run, it) / name)


def history(tmp_path, run: str) -> dict:
    return json.loads((_checkpoint(tmp_path / run, 2) / "state.json").read_text())["history"]


def _eval_file(tmp_path):
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))
    return evalf


@pytest.mark.slow
def test_flow_trainer_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    """A process evaluates the branch points of its own part of each group, so 1 and 2 processes run them in calls
    of different sizes: the same maths, rounded differently."""
    evalf = _eval_file(tmp_path)

    def train(out: str, processes: int) -> None:
        # the shapes preset on the shipped model (G²RPO branches, Pref-GRPO win rates from the verifier, KL), small:
        # 2 prompts x 8 samples in 2 optimizer steps, each one group split over the processes, 2 forwards of 2 each
        _run(["-m", "flowgrpo.cli", "train", "--out", out, "--iterations", "2", "--prompts-per-iter", "2",
              "--group-size", "8", "--optimizer-steps", "2", "--micro-batch", "2", "--num-steps", "4",
              "--sde-steps", "3", "--eval-prompts",
              str(evalf), "--eval-num-steps", "2", "--eval-images-per-prompt", "2", "--eval-every", "100",
              "--save-every", "1", "--max-minutes", "0", "--optim", "sgd", "--lr", "1e-2", "--log-with", ""],
             processes, tmp_path)

    one_two_resumed(train, tmp_path)
    base = load_file(SHAPES_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    for it in (1, 2):  # iteration 1's weights are the first step's all-reduced gradient: w0 - lr g
        same_training(weights(tmp_path, "one", it), weights(tmp_path, "two", it), base, it)
    same_training(weights(tmp_path, "one", 2), weights(tmp_path, "resumed", 2), base, 2)
    same_history(history(tmp_path, "one")["train"], history(tmp_path, "two")["train"],
                 BEFORE_THE_OPTIMIZER + ("adv/winrate_std",))
    same_history(history(tmp_path, "one")["train"], history(tmp_path, "resumed")["train"])
    summaries = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")}
    assert summaries["two"]["processes"] == 2
    # the sharded evaluation scores the same images as one process
    assert summaries["one"]["base"] == summaries["two"]["base"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [
    ("diffusion_nft", ["--diffusion-nft.time-fraction", "0.5", "--diffusion-nft.lag-rate", "0.2"]),
    ("awm", ["--awm.train-levels", "2", "--awm.ema-warmup", "2"])])
def test_forward_strategies_on_two_processes_equal_one_and_resume_on_one(tmp_path, strategy, options):
    """DiffusionNFT and AWM (the preset's Pref-GRPO win rates, KL, a lagged copy that moves from the first
    iteration): each sample's levels and noise are its own, so 1 and 2 processes compute the same losses and the same
    first gradient, train the same weights, and a 2-process checkpoint (with its lagged copy) resumes on 1.

    The matching residual v - (ε - x0) is a small difference of two velocities of order 1, so a forward's rounding
    reaches the gradient amplified: on one process the first gradient's norm already moves by 1.5e-5 of itself
    between micro-batches of 1 and 2 rows (AWM, measured). Its norm is compared at 1e-4; a world-size bug moves it
    by order 1, and the weights are compared as for every strategy."""
    evalf = _eval_file(tmp_path)

    def train(out: str, processes: int) -> None:
        # 2 prompts x 4 samples in one optimizer step (a group on each process), forwards of 2 rows
        _run(["-m", "flowgrpo.cli", "train", "--strategy", strategy, *options, "--out", out, "--iterations", "2",
              "--prompts-per-iter", "2", "--group-size", "4", "--optimizer-steps", "1", "--micro-batch", "2",
              "--num-steps", "4", "--beta", "0.01", "--eval-prompts", str(evalf), "--eval-num-steps", "2",
              "--eval-images-per-prompt", "1", "--eval-every", "100", "--save-every", "1", "--max-minutes", "0",
              "--optim", "sgd", "--lr", "1e-2", "--log-with", ""], processes, tmp_path)

    one_two_resumed(train, tmp_path)
    base = load_file(SHAPES_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    for it in (1, 2):
        same_training(weights(tmp_path, "one", it), weights(tmp_path, "two", it), base, it)
    same_training(weights(tmp_path, "one", 2), weights(tmp_path, "resumed", 2), base, 2)
    lag = {k.removeprefix("lagged."): v for k, v in weights(tmp_path, "one", 2, "strategy.safetensors").items()}
    assert any(not torch.equal(lag[k], base[k]) for k in lag)  # the lagged copy moved, and moved the same way
    for run in ("two", "resumed"):
        other = {k.removeprefix("lagged."): v for k, v in weights(tmp_path, run, 2, "strategy.safetensors").items()}
        same_training(lag, other, base, 2)
    keys = ("reward_mean", "reward_std", "adv/n_valid", "adv/winrate_std")
    for run in ("two", "resumed"):
        one, other = history(tmp_path, "one")["train"], history(tmp_path, run)["train"]
        same_history(one, other, keys, grad_rel=1e-4)
        assert one[0]["loss"] == pytest.approx(other[0]["loss"], rel=1e-5)  # before any optimizer step


@pytest.mark.slow
def test_fsdp_sharded_flow_training_equals_one_process_and_exports_whole_weights(tmp_path):
    """FSDP2 on 2 processes (every transformer block sharded), each group split over the processes: the same weights
    and weight average as one process after 2 iterations, a sharded checkpoint resumes on one process, and the export
    holds the whole (averaged) transformer."""
    evalf = _eval_file(tmp_path)

    def train(out: str, processes: int) -> None:
        # pointwise GRPO advantages; 2 prompts x 8 samples in 2 optimizer steps, each one group split over the
        # processes
        _run(["-m", "flowgrpo.cli", "train", "--out", out, "--iterations", "2", "--strategy", "flow_grpo", "--judge", "",
              "--prompts-per-iter", "2", "--group-size", "8", "--optimizer-steps", "2", "--micro-batch", "4",
              "--num-steps", "4",
              "--sde-steps", "2", "--eval-prompts", str(evalf), "--eval-num-steps", "2", "--eval-images-per-prompt",
              "2", "--eval-every", "100", "--save-every", "1", "--max-minutes", "0", "--optim", "sgd", "--lr", "1e-2",
              "--ema-decay", "0.9", "--sharding", "fsdp", "--log-with", ""], processes, tmp_path)

    one_two_resumed(train, tmp_path)
    base = load_file(SHAPES_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    for f in ("weights.safetensors", "ema.safetensors"):
        one = weights(tmp_path, "one", 2, f)
        same_training(one, weights(tmp_path, "two", 2, f), base, 2)
        same_training(one, weights(tmp_path, "resumed", 2, f), base, 2)
    same_history(history(tmp_path, "one")["train"], history(tmp_path, "two")["train"])
    exported = load_file(tmp_path / "two" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = weights(tmp_path, "two", 2, "ema.safetensors")
    assert max(float((ema[k] - exported[k]).abs().max()) for k in ema) == 0
    assert "fsdp" in (tmp_path / "two" / "config.json").read_text()


@pytest.mark.slow
def test_co_grpo_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    """The shipped masked diffusion model, model and schedule trained jointly (Pref-GRPO win rates from the verifier,
    KL): the same parameters after each iteration on 1 process, on 2, and on 2 then 1."""
    from flowgrpo.assets import SHAPES_MDM
    from flowgrpo.policies.mdm import MaskedDiffusionPolicy

    evalf = _eval_file(tmp_path)

    def train(out: str, processes: int) -> None:
        # 2 prompts x 4 samples in 2 optimizer steps, each one group split over the processes; the model trains on
        # 2 of the 24 steps
        _run(["-m", "flowgrpo.cli", "train", "--preset", "shapes-mdm", "--out", out, "--iterations", "2",
              "--prompts-per-iter", "2", "--group-size", "4", "--optimizer-steps", "2", "--micro-batch", "2",
              "--train-steps", "2",
              "--judge", "shapes", "--beta", "0.05", "--eval-prompts", str(evalf), "--eval-images-per-prompt", "1",
              "--eval-every", "100", "--save-every", "1", "--optim", "sgd", "--lr", "1e-1", "--schedule-lr", "1e-1",
              "--log-with", ""], processes, tmp_path)

    one_two_resumed(train, tmp_path)
    start = MaskedDiffusionPolicy.from_pretrained(SHAPES_MDM, mode="joint").trainable_state_dict()
    one = weights(tmp_path, "one", 2)
    assert {k.split(".")[0] for k in one} == {"transformer", "schedule"}
    assert not torch.equal(one["schedule.mean"], start["schedule.mean"])  # training moved the schedule
    for it in (1, 2):
        same_training(weights(tmp_path, "one", it), weights(tmp_path, "two", it), start, it)
    same_training(one, weights(tmp_path, "resumed", 2), start, 2)
    same_history(history(tmp_path, "one")["train"], history(tmp_path, "two")["train"])
    same_history(history(tmp_path, "one")["train"], history(tmp_path, "resumed")["train"])
    summaries = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")}
    assert summaries["two"]["processes"] == 2 and summaries["one"]["base"] == summaries["two"]["base"]


LLM_SCRIPT = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from flowgrpo.llm import GRPO

    path, out, sharding = sys.argv[1], sys.argv[2], sys.argv[3]

    def distinct(prompts, completions, **_):
        return [len(set(c)) / 8 for c in completions]

    data = [{"prompt": p} for p in ["ab", "xyz", "hello", "q", "12+3", "zz", "k", "mn"]]
    trainer = GRPO(AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path), distinct,
                   num_generations=4, prompts_per_step=2, micro_batch_size=2, max_new_tokens=8, optim="sgd",
                   learning_rate=1e-1, stop=tuple("aeiou"), advantage="spo", beta=0.05, output_dir=out, save_every=1,
                   sharding=sharding)
    trainer.train(data, iterations=2, progress=False)
    result = trainer.evaluate(data[:5], samples=2, greedy=False, batch=2)  # 5 prompts: a process pads its share
    if trainer.trainer.dist.is_main:
        (Path(out) / "eval.json").write_text(json.dumps(result.completions))
''')


@pytest.fixture(scope="module")
def llm_runs(tmp_path_factory):
    """One 1-process LLM run, and for each sharding its 2-process run and that run resumed on 1 process."""
    tmp_path = tmp_path_factory.mktemp("llm")
    model = build_tiny_causal_lm(tmp_path / "tiny", seed=2)
    script = tmp_path / "llm_run.py"
    script.write_text(LLM_SCRIPT)
    for sharding in ("ddp", "fsdp"):
        one_two_resumed(lambda out, processes: _run([str(script), str(model), out, sharding], processes, tmp_path),
                        tmp_path, f"two-{sharding}", f"resumed-{sharding}")
    from transformers import AutoModelForCausalLM

    return tmp_path, {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(model).named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_llm_trainer_on_two_processes_equals_one_and_resumes_on_one(llm_runs, sharding):
    """The completions, rewards and SPO tracker are identical; the weights agree to the rounding bound."""
    tmp_path, start = llm_runs
    two, resumed = f"two-{sharding}", f"resumed-{sharding}"
    for it in (1, 2):
        same_training(weights(tmp_path, "one", it), weights(tmp_path, two, it), start, it)
    same_training(weights(tmp_path, "one", 2), weights(tmp_path, resumed, 2), start, 2)
    states = [json.loads((_checkpoint(tmp_path / run, 2) / "state.json").read_text()) for run in ("one", two, resumed)]
    # SPO's per-prompt statistics, from the gathered rewards, and carried by the checkpoint
    assert states[0]["tracker"] == states[1]["tracker"] == states[2]["tracker"]
    for state in states[1:]:
        rewards = [[h["reward_mean"] for h in s["history"]["train"]] for s in (states[0], state)]
        assert rewards[0] == rewards[1]
        same_history(states[0]["history"]["train"], state["history"]["train"])
    # the evaluation split over 2 processes makes the completions one process makes
    evals = [json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", two, resumed)]
    assert evals[0] == evals[1] == evals[2] and len(evals[0]) == 5


def test_every_sample_draws_its_own_noise_whatever_process_draws_it():
    """The initial noise each of 2 ranks draws for its rows equals what one process draws for the same global
    samples, all of it pairwise distinct (without shared noise) or distinct across groups and equal within one;
    SDE noise keys never repeat across ranks either."""
    noise = {}
    for shared in (False, True):
        cfg = TrainConfig(prompts_per_iter=4, group_size=4, micro_batch=4, shared_noise=shared,
                          strategy="flow_grpo")
        rows = [{"prompt": str(i)} for i in range(4) for _ in range(4)]
        group_ids = torch.arange(4).repeat_interleave(4)
        per_rank = {}
        for processes in (1, 2):
            layout = BatchLayout(16, processes, 1, 4)
            for rank in range(processes):
                plan = Plan(3, cfg.seed, rows, group_ids, layout.local_indices(rank), layout, single())
                per_rank[processes, rank] = (plan.indices, initial_noise(cfg, plan, (4, 8, 8)), sde_noise(cfg, plan).keys)
        whole = per_rank[1, 0][1]
        halves = torch.cat([per_rank[2, 0][1], per_rank[2, 1][1]])
        assert torch.equal(halves, whole[torch.cat([per_rank[2, 0][0], per_rank[2, 1][0]])])
        flat = whole.flatten(1)
        same = (flat[:, None] == flat[None]).all(-1)
        expected = group_ids[:, None] == group_ids[None] if shared else torch.eye(16, dtype=torch.bool)
        assert torch.equal(same, expected)
        sde_keys = per_rank[2, 0][2] + per_rank[2, 1][2]
        assert len(set(sde_keys)) == 16 and sde_keys == per_rank[1, 0][2]
        noise[shared] = whole
    assert not torch.equal(noise[True][0], noise[False][0])


def test_a_launcher_without_a_process_group_is_refused(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", HF_HUB_OFFLINE="1")
    env.pop("MASTER_ADDR", None)
    done = subprocess.run([sys.executable, "-m", "flowgrpo.cli", "train", "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "flowgrpo train: error: the launcher asked for 2 processes (WORLD_SIZE=2)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
