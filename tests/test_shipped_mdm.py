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
def test_eval_geneval_reproduces_the_recorded_base_accuracy():
    """BENCHMARKS.md's base accuracy of the shipped MDM comes from the fixture's command (on the shipped MDM), whose
    verdicts, image by image, ship beside the test. Its batches 0 and 3 (128 images; single_object, two_object,
    colors, position, color_attr) are made again exactly as the whole command makes them; at most 2% may flip."""
    from flowgrpo.prompts.shapes import load_split
    from tests.eval_shards import command_verdicts, tag_accuracy

    recorded = json.loads((Path(__file__).parent / "fixtures" / "shapes_mdm_eval.json").read_text())
    args = ["--model", str(SHAPES_MDM), *recorded["args"]]
    assert tag_accuracy(recorded["verdicts"], args) == pytest.approx(recorded["accuracy"], abs=1e-12)
    again = command_verdicts(args, rank=0, of=3)
    tags = {load_split("test")[i]["tag"] for i in again}
    assert len(again) == 128 and len(tags) == 5
    flipped = [i for i, ok in again.items() if ok != (recorded["verdicts"][i] == "1")]
    assert len(flipped) <= 0.02 * len(again), flipped


def _trained_log_probs(task, ro, mask, micro_batch: int) -> torch.Tensor:
    """[b, 2T] log-probs of the rollout's columns under the current parameters, 0 where ``mask`` is 0."""
    out = torch.zeros_like(mask)
    with torch.no_grad():
        for chunk in task.policy.chunks(ro, slice(0, len(ro)), micro_batch):
            cols = torch.arange(chunk.cols.start, chunk.cols.stop, chunk.cols.step or 1)
            out[chunk.rows[:, None], cols[None]] = task.policy.log_prob(ro, chunk)[0]
    return out * mask


@pytest.mark.parametrize("mode", ["model", "schedule"])
def test_one_update_at_the_preset_learning_rates_moves_each_trajectory_along_its_advantage(tmp_path, mode):
    """The shapes-mdm preset's learning rates are small enough that one update raises the log-prob of the
    trajectories with positive advantages and lowers the others' (at 10x them everything fell: an overshoot)."""
    from flowgrpo.config import make_config
    from flowgrpo.prompts.loaders import load_prompts
    from flowgrpo.train import build_trainer, draw_prompts
    from flowgrpo.update import ppo_update
    from tests.helpers import single

    cfg = make_config("shapes-mdm", overrides={"co_grpo.mode": mode, "prompts_per_iter": 4, "group_size": 6,
                                               "micro_batch": 24, "out": str(tmp_path), "log_with": "", "save_every": 0})
    trainer = build_trainer(cfg, single())
    task = trainer.task
    plan = trainer.plan(draw_prompts(load_prompts(cfg.prompts), cfg, 0))
    ro = task.rollout(plan)
    adv = task.advantages(ro, task.score(ro, plan), plan, trainer)
    batch = task.update_batch(ro, adv)
    before = _trained_log_probs(task, ro, batch.mask, cfg.micro_batch)
    ppo_update(task.policy, trainer.optimizer, trainer.module, batch, cfg, trainer.layout, trainer.dist)
    moved = (_trained_log_probs(task, ro, batch.mask, cfg.micro_batch) - before).sum(dim=1)
    a = adv.advantages
    assert (a > 0).any() and (a < 0).any()
    assert moved[a > 0].mean() > 0 > moved[a < 0].mean(), (moved, a)
    assert torch.corrcoef(torch.stack([moved, a]))[0, 1] > 0.3
