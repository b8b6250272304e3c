"""The shipped Shapes base model: loads offline with plain diffusers, follows its prompts, reproduces its accuracy."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.pretrain.data import render_batch
from flowgrpo.pretrain.model import LATENT_SCALE, MAX_SEQUENCE_LENGTH, encode_prompts
from flowgrpo.pretrain.sampling import conditioning_probe
from flowgrpo.prompts.loaders import tag_balanced_indices
from flowgrpo.prompts.shapes import load_split


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion3Pipeline.from_pretrained(SHAPES_MODEL, text_encoder_3=None, tokenizer_3=None)


def test_shipped_model_is_small_and_complete():
    size = sum(f.stat().st_size for f in SHAPES_MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    record = json.loads((SHAPES_MODEL / "flowgrpo_pretrain.json").read_text())
    assert record["config"]["seed"] == 0 and record["record"]["step"] == record["config"]["steps"]


def test_conditioning_probe_right_prompt_beats_shuffled(pipe):
    train = load_split("train")
    rng = np.random.default_rng(123)
    idx = tag_balanced_indices(train, 128, rng)
    latents = render_batch(train, idx, rng) * LATENT_SCALE
    embeds, pooled = encode_prompts(pipe, [train[i]["prompt"] for i in idx])
    for t in (0.5, 0.9):
        probe = conditioning_probe(pipe.transformer, latents, embeds, pooled, t=t)
        assert probe["right"] < probe["shuffled"] and probe["gap"] > 0.05, probe


def test_plain_diffusers_call_draws_the_prompt(pipe):
    from flowgrpo.shapes.verify import detect

    image = pipe("a photo of a blue square", num_inference_steps=20, guidance_scale=4.5, max_sequence_length=MAX_SEQUENCE_LENGTH,
                 generator=torch.Generator().manual_seed(0), output_type="np", num_images_per_prompt=8).images
    found = [(d.shape, d.color) for img in (image * 255).round().astype(np.uint8) for d in detect(img)]
    assert found.count(("square", "blue")) >= 4, found


@pytest.mark.slow
def test_eval_geneval_reproduces_the_recorded_base_accuracy():
    """BENCHMARKS.md's base accuracy comes from the fixture's command, whose verdicts, image by image, ship beside the
    test. A third of its images (its batches 1, 4 and 7: 192 images, every tag) are made again exactly as the whole
    command makes them; at most 2% of them may flip (float rounding of another host can flip a borderline image)."""
    from tests.eval_shards import command_verdicts, tag_accuracy

    recorded = json.loads((Path(__file__).parent / "fixtures" / "shapes_base_eval.json").read_text())
    assert tag_accuracy(recorded["verdicts"], recorded["args"]) == pytest.approx(recorded["accuracy"], abs=1e-12)
    again = command_verdicts(recorded["args"], rank=1, of=3)
    tags = {e["tag"] for i, e in enumerate(e for e in load_split("test") for _ in range(2)) if i in again}
    assert len(again) == 192 and len(tags) == 6
    flipped = [i for i, ok in again.items() if ok != (recorded["verdicts"][i] == "1")]
    assert len(flipped) <= 0.02 * len(again), flipped
