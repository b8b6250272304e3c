"""Several processes (gloo on CPU, started by torchrun) give the run one process gives: same parameters after the
same iterations for the flow trainer (the Shapes preset's G²RPO + Pref-GRPO) and the LLM trainer, a checkpoint
written by 2 processes resumes on 1, and every sample's noise is its own whatever process draws it."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.config import TrainConfig
from flowgrpo.strategies import initial_noise, sde_noise
from flowgrpo.policies.llm_tiny import build_tiny_causal_lm
from flowgrpo.prompts.shapes import load_split
from flowgrpo.settings import BatchLayout
from flowgrpo.trainer import Plan
from tests.helpers import single

TOLERANCE = 1e-5  # fp32: the ranks' partial gradients are summed in another order


def _run(args: list[str], processes: int, tmp_path) -> None:
    """Run ``python -m ...`` (or a script) on ``processes`` processes, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = launch + args if processes > 1 else [sys.executable] + args
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _one_two_mixed(train, tmp_path) -> dict:
    """Runs "one" (2 iterations on 1 process), "two" (on 2) and "mixed" (1 on 2 processes, resumed on 1 for the
    second); the trained weights of each run at iterations 1 and 2."""
    train("one", 2, 1)
    train("two", 2, 2)
    train("mixed", 1, 2)
    train("mixed", 2, 1)
    return {run: {it: load_file(tmp_path / run / "checkpoints" / f"iter-00000{it}" / "weights.safetensors")
                  for it in (1, 2)} for run in ("one", "two", "mixed")}


@pytest.mark.slow
def test_flow_trainer_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    """At a learning rate of 1e-4: a process evaluates the branch points of its own groups, so 1 and 2 processes
    run them in calls of different sizes, whose fp32 results differ in the last bits; Adam moves an entry by about lr
    whatever the size of its gradient, which turns that into weight differences of order lr / 30 (3.6e-5 at 1e-3)."""
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))

    def train(out: str, iterations: int, processes: int) -> None:
        # the shapes preset on the shipped model (G²RPO branches, Pref-GRPO win rates from the verifier, KL), small:
        # 4 prompts x 4 samples = 16 per iteration: 8 per process in 2 forward passes of 4
        _run(["-m", "flowgrpo.cli", "train", "--out", out, "--iterations", str(iterations),
              "--prompts-per-iter", "4", "--group-size", "4", "--micro-batch", "4", "--num-steps", "4",
              "--sde-steps", "3", "--eval-prompts", str(evalf), "--eval-num-steps", "2",
              "--eval-images-per-prompt", "2", "--eval-every", "100", "--save-every", "1", "--max-minutes", "0",
              "--lr", "1e-4", "--log-with", ""], processes, tmp_path)

    weights = _one_two_mixed(train, tmp_path)
    base = load_file(SHAPES_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    assert _max_diff(weights["one"][2], {k: base[k] for k in weights["one"][2]}) > 1e-4  # training moved the model
    for it in (1, 2):
        assert _max_diff(weights["one"][it], weights["two"][it]) <= TOLERANCE
        assert _max_diff(weights["two"][it], weights["mixed"][it]) <= TOLERANCE
    summaries = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")}
    assert summaries["two"]["processes"] == 2
    # the sharded evaluation scores the same images as one process
    assert summaries["one"]["base"] == summaries["two"]["base"]
    hist = {run: json.loads((tmp_path / run / "checkpoints" / "iter-000002" / "state.json").read_text())["history"]
            for run in ("one", "two")}
    for key in ("reward_mean", "adv/n_valid", "adv/winrate_std", "clip_frac"):
        assert [h[key] for h in hist["one"]["train"]] == pytest.approx([h[key] for h in hist["two"]["train"]],
                                                                       abs=1e-6), key


@pytest.mark.slow
def test_fsdp_sharded_flow_training_equals_one_process_and_exports_whole_weights(tmp_path):
    """FSDP2 on 2 processes (every transformer block sharded): the same weights and weight average as one process
    after 2 iterations, a sharded checkpoint resumes on one process, and the export holds the whole (averaged)
    transformer."""
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))

    def train(out: str, iterations: int, processes: int) -> None:
        _run(["-m", "flowgrpo.cli", "train", "--out", out, "--iterations", str(iterations), "--strategy", "flow_grpo",
              "--prompts-per-iter", "4", "--group-size", "4", "--micro-batch", "4", "--num-steps", "4",
              "--sde-steps", "2", "--eval-prompts", str(evalf), "--eval-num-steps", "2", "--eval-images-per-prompt",
              "2", "--eval-every", "100", "--save-every", "1", "--max-minutes", "0", "--lr", "1e-3",
              "--ema-decay", "0.9", "--sharding", "fsdp", "--log-with", ""], processes, tmp_path)

    train("one", 2, 1)
    train("two", 2, 2)
    train("mixed", 1, 2)
    train("mixed", 2, 1)
    ck = lambda run: tmp_path / run / "checkpoints" / "iter-000002"  # noqa: E731
    for f in ("weights.safetensors", "ema.safetensors"):
        one, two, mixed = (load_file(ck(run) / f) for run in ("one", "two", "mixed"))
        assert _max_diff(one, two) <= TOLERANCE and _max_diff(two, mixed) <= TOLERANCE
    exported = load_file(tmp_path / "two" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(ck("two") / "ema.safetensors")
    assert _max_diff(ema, {k: exported[k] for k in ema}) == 0
    assert "fsdp" in (tmp_path / "two" / "config.json").read_text()



@pytest.mark.slow
def test_co_grpo_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    """The shipped masked diffusion model, model and schedule trained jointly (Pref-GRPO win rates from the verifier,
    KL): the same parameters after each iteration on 1 process, on 2, and on 2 then 1."""
    from flowgrpo.assets import SHAPES_MDM
    from flowgrpo.policies.schedule import SchedulePolicy

    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::60]))

    def train(out: str, iterations: int, processes: int) -> None:
        # 4 prompts x 4 samples: 8 per process in 2 forward passes of 4; the model trains on 2 of the 24 steps
        _run(["-m", "flowgrpo.cli", "train", "--preset", "shapes-mdm", "--out", out, "--iterations", str(iterations),
              "--prompts-per-iter", "4", "--group-size", "4", "--micro-batch", "4", "--train-steps", "2",
              "--judge", "shapes", "--beta", "0.05", "--eval-prompts", str(evalf), "--eval-images-per-prompt", "1",
              "--eval-every", "100", "--save-every", "1", "--lr", "1e-3", "--log-with", ""], processes, tmp_path)

    weights = _one_two_mixed(train, tmp_path)
    assert {k.split(".")[0] for k in weights["one"][2]} == {"transformer", "schedule"}
    start = SchedulePolicy.from_pretrained(SHAPES_MDM / "schedule")
    assert not torch.equal(weights["one"][2]["schedule.mean"], start.mean.detach())  # training moved the schedule
    for it in (1, 2):
        assert _max_diff(weights["one"][it], weights["two"][it]) <= TOLERANCE
        assert _max_diff(weights["two"][it], weights["mixed"][it]) <= TOLERANCE
    summaries = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")}
    assert summaries["two"]["processes"] == 2 and summaries["one"]["base"] == summaries["two"]["base"]


LLM_SCRIPT = textwrap.dedent('''
    import sys
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from flowgrpo.llm import GRPO

    path, out, steps, sharding = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def distinct(prompts, completions, **_):
        return [len(set(c)) / 8 for c in completions]

    data = [{"prompt": p} for p in ["ab", "xyz", "hello", "q", "12+3", "zz", "k", "mn"]]
    trainer = GRPO(AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path), distinct,
                   num_generations=4, prompts_per_step=2, micro_batch_size=2, max_new_tokens=8, learning_rate=1e-4,
                   stop=tuple("aeiou"), advantage="spo", beta=0.05, output_dir=out, save_every=1, sharding=sharding)
    trainer.train(data, num_steps=steps, progress=False)
''')


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_llm_trainer_on_two_processes_equals_one_and_resumes_on_one(tmp_path, sharding):
    """The completions, rewards and SPO tracker are identical; the weights agree to the tolerance at a learning rate
    of 1e-4: Adam moves an entry by about lr whatever the size of its gradient, so entries whose gradient is near 0
    turn the summation-order rounding of 1 vs 2 processes into differences of order lr (4.8e-4 at lr 1e-2)."""
    model = build_tiny_causal_lm(tmp_path / "tiny", seed=2)
    script = tmp_path / "llm_run.py"
    script.write_text(LLM_SCRIPT)
    for out, steps, processes in (("one", 2, 1), ("two", 2, 2), ("mixed", 1, 2), ("mixed", 2, 1)):
        _run([str(script), str(model), out, str(steps), sharding], processes, tmp_path)
    ck = lambda run, it: tmp_path / run / "checkpoints" / f"iter-00000{it}"  # noqa: E731
    for it in (1, 2):
        one, two, mixed = (load_file(ck(run, it) / "weights.safetensors") for run in ("one", "two", "mixed"))
        assert _max_diff(one, two) <= TOLERANCE and _max_diff(two, mixed) <= TOLERANCE
    states = [json.loads((ck(run, 2) / "state.json").read_text()) for run in ("one", "two")]
    assert states[0]["tracker"] == states[1]["tracker"]  # SPO's per-prompt statistics, from the gathered rewards
    first = load_file(ck("one", 1) / "weights.safetensors")
    assert _max_diff(first, load_file(ck("one", 2) / "weights.safetensors")) > 5e-5  # the second step moved it
    rewards = [[h["reward_mean"] for h in s["history"]["train"]] for s in states]
    assert rewards[0] == rewards[1]


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
