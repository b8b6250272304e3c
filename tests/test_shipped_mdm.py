"""The shipped Shapes masked diffusion model: small, loads offline with plain diffusers, follows its prompts, and
reproduces its recorded base accuracy."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AmusedPipeline

from flowgrpo.assets import SHAPES_MDM
from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.shapes.verify import detect


def test_shipped_mdm_is_small_and_complete():
    size = sum(f.stat().st_size for f in SHAPES_MDM.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    record = json.loads((SHAPES_MDM / "flowgrpo_pretrain.json").read_text())
    assert record["config"]["kind"] == "mdm" and record["record"]["step"] == record["config"]["steps"]
    policy = MaskedDiffusionPolicy.from_pretrained(SHAPES_MDM)
    schedule = record["schedule"]  # set after pretraining (its note says how)
    mean = policy.schedule.mean_schedule()
    assert policy.schedule.num_steps == schedule["steps"]
    assert [float(mean[0, 1]), float(mean[0, 2]), float(mean[0, 3])] == pytest.approx(
        [schedule["temperature"], schedule["remask"], schedule["cfg"]])


def test_plain_diffusers_call_draws_the_prompt():
    """aMUSEd's own scheduler (cosine, choice temperature 2 -> 0, sampling temperature 1) also samples it."""
    pipe = AmusedPipeline.from_pretrained(SHAPES_MDM)
    images = pipe("a photo of a blue square", num_inference_steps=12, guidance_scale=3.0, num_images_per_prompt=8,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    found = [(d.shape, d.color) for img in (images * 255).round().astype(np.uint8) for d in detect(img)]
    assert found.count(("square", "blue")) >= 3, found


@pytest.mark.slow
def test_eval_geneval_reproduces_the_recorded_base_accuracy(tmp_path):
    """BENCHMARKS.md's base accuracy of the shipped MDM comes from this exact command."""
    from flowgrpo.cli import main

    recorded = json.loads((Path(__file__).parent / "fixtures" / "shapes_mdm_eval.json").read_text())
    assert main(["eval", "geneval", "--model", str(SHAPES_MDM), *recorded["args"], "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    for tag, acc in recorded["accuracy"].items():  # same seeds and maths; float rounding may flip an image
        assert abs(result["accuracy"][tag] - acc) <= 0.02, (tag, result["accuracy"][tag], acc)
