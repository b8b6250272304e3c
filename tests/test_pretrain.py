"""`pretrain-shapes`: a stopped run resumes exactly, continued pretraining starts from a saved model, and bad
resumptions are refused before anything is overwritten."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.pretrain.pretrain import STATE_FILE, PretrainConfig, pretrain

TINY = dict(steps=4, batch_size=4, patch_size=4, num_layers=1, head_dim=8, heads=2, eval_every=2, eval_per_tag=1,
            eval_steps=2, threads=1)


def weights(run, step):
    return load_file(run / f"step{step:06d}" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_stopped_run_resumes_as_if_never_stopped(tmp_path):
    straight = PretrainConfig(out=str(tmp_path / "a"), **TINY)
    pretrain(straight)
    stopped = replace(straight, out=str(tmp_path / "b"), max_minutes=1e-9)  # stops after its first step
    pretrain(stopped)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["step"] == 1
    assert not (tmp_path / "b" / "step000002").exists()
    pretrain(replace(stopped, max_minutes=0.0, resume=True))
    for step in (2, 4):
        a, b = weights(tmp_path / "a", step), weights(tmp_path / "b", step)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)
    assert state["step"] == 4 and state["minutes"] > 0


def test_resume_refuses_other_options_and_new_runs_refuse_to_overwrite(tmp_path):
    cfg = PretrainConfig(out=str(tmp_path), **TINY)
    pretrain(cfg)
    before = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(ValueError, match="pass --resume"):
        pretrain(cfg)
    with pytest.raises(ValueError, match=r"changed: lr: 0.0005 -> 0.001"):
        pretrain(replace(cfg, lr=1e-3, resume=True))
    assert (tmp_path / STATE_FILE).read_bytes() == before
    with pytest.raises(ValueError, match="no state.pt"):
        pretrain(replace(cfg, out=str(tmp_path / "empty"), resume=True))
    (tmp_path / STATE_FILE).write_bytes(before[: len(before) // 2])  # a state cut short
    with pytest.raises(ValueError, match="cannot read .*state.pt as a pretraining state"):
        pretrain(replace(cfg, resume=True))
    assert (tmp_path / STATE_FILE).read_bytes() == before[: len(before) // 2]


def test_init_starts_from_a_saved_model_and_checks_its_shape(tmp_path):
    first = PretrainConfig(out=str(tmp_path / "first"), **TINY)
    pretrain(first)
    saved = tmp_path / "first" / "step000004"
    # lr 0: the online weights never move, so the EMA (and every checkpoint) stays the initial model
    pretrain(replace(first, out=str(tmp_path / "again"), init=str(saved), lr=0.0, steps=2))
    a, b = weights(tmp_path / "first", 4), weights(tmp_path / "again", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="num_layers=1"):
        pretrain(replace(first, out=str(tmp_path / "bigger"), init=str(saved), num_layers=2))
    with pytest.raises(ValueError, match="not a Shapes pipeline"):
        pretrain(replace(first, out=str(tmp_path / "none"), init=str(tmp_path)))


def test_cli_runs_pretraining_with_its_options(tmp_path):
    from flowgrpo.cli import main

    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "steps"]
    assert main(["pretrain-shapes", "--out", str(tmp_path), "--steps", "2", *args]) == 0
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2
    assert (tmp_path / "step000002" / "model_index.json").is_file()
