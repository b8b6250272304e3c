"""The Shapes masked diffusion model: an exact pixel tokeniser in aMUSEd's VQModel, pretraining that resumes exactly,
and the sample / eval commands on an AmusedPipeline directory."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.cli import main
from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.pretrain.mdm_model import MASK_ID, PALETTE, build_palette_vq, palette_tokens
from flowgrpo.pretrain.pretrain import STATE_FILE, PretrainConfig, pretrain
from flowgrpo.prompts.loaders import tag_balanced_indices
from flowgrpo.prompts.shapes import load_split
from flowgrpo.shapes.render import render

TINY = dict(kind="mdm", steps=4, batch_size=4, num_layers=1, head_dim=8, heads=2, eval_every=2, eval_per_tag=1,
            eval_steps=3, eval_temperature=1.0, threads=1)  # temperature 1: the hand-set schedule's


def test_the_vq_model_tokenises_rendered_images_exactly():
    train = load_split("train")
    rng = np.random.default_rng(0)
    images = np.stack([render(train[i], rng) for i in tag_balanced_indices(train, 32, rng)])
    vq = build_palette_vq()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        _, _, (_, _, indices) = vq.quantize(vq.encode(x).latents)
        tokens = palette_tokens(images)
        assert torch.equal(indices.view(32, 32, 32), tokens) and MASK_ID == len(PALETTE) == 5
        decoded = vq.decode(tokens, force_not_quantize=True, shape=(32, 32, 32, 3)).sample
    assert torch.equal((decoded.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1), torch.from_numpy(images))
    assert set(tokens.unique().tolist()) == set(range(5))


def test_mdm_pretraining_resumes_as_if_never_stopped(tmp_path):
    straight = PretrainConfig(out=str(tmp_path / "a"), **TINY)
    pretrain(straight)
    stopped = replace(straight, out=str(tmp_path / "b"), max_minutes=1e-9)  # stops after its first step
    pretrain(stopped)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["step"] == 1
    pretrain(replace(stopped, max_minutes=0.0, resume=True))
    for step in (2, 4):
        a, b = (load_file(tmp_path / run / f"step{step:06d}" / "transformer" / "diffusion_pytorch_model.safetensors")
                for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "step000004" / "flowgrpo_pretrain.json").read_text())
    assert record["config"]["lr"] == 1e-3 and record["config"]["head_dim"] == 8  # the kind's defaults, resolved
    policy = MaskedDiffusionPolicy.from_pretrained(tmp_path / "a" / "step000004")
    mean = policy.schedule.mean_schedule()
    assert policy.schedule.num_steps == 3 and float(mean[0, 3]) == 3.0  # eval_cfg
    assert float(mean[0, 1]) == 1.0 and float(mean[0, 2]) == 2.0  # eval_temperature, eval_remask at the first step


def test_sampling_options_of_the_mdm_are_refused_for_the_flow_model():
    with pytest.raises(ValueError, match="--eval-temperature applies to the masked diffusion model"):
        PretrainConfig(kind="flow", eval_temperature=0.5).resolved()
    assert PretrainConfig(kind="mdm").resolved().eval_remask == 2.0


def test_sample_and_eval_commands_take_a_masked_diffusion_model(tmp_path):
    pretrain(PretrainConfig(out=str(tmp_path / "pt"), **TINY))
    model = str(tmp_path / "pt" / "step000004")
    assert main(["sample", "--model", model, "--prompt", "a photo of a red circle", "--images-per-prompt", "2", "--out",
                 str(tmp_path / "img")]) == 0
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["000.png", "001.png"]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::50]))
    for run, extra in (("own", []), ("hand-set", ["--num-steps", "5", "--guidance", "2.0"])):
        assert main(["eval", "geneval", "--model", model, "--prompts", str(meta), "--images-per-prompt", "2", "--micro-batch", "4",
                     "--out", str(tmp_path / run), *extra]) == 0
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("own", "hand-set")}
    assert results["own"]["n_images"] == {tag: 2 for tag in results["own"]["n_images"]}
    policy = MaskedDiffusionPolicy.from_pretrained(model)
    seeds = torch.tensor([1, 2])
    own = policy.generate(["a photo of a circle"] * 2, x_init=seeds)
    assert not torch.equal(own, policy.generate(["a photo of a circle"] * 2, num_steps=5, x_init=seeds))
    assert torch.equal(own, policy.generate(["a photo of a circle"] * 2, num_steps=3, guidance=3.0, x_init=seeds))
