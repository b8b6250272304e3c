"""Co-GRPO on a tiny masked diffusion model (an AmusedPipeline built from config): ratio 1 on the first inner step
in every mode, each mode trains only its part, exact resume and export of model and schedule, KL, every advantage
estimator and the Pref-GRPO judge, and rollouts that do not depend on how many processes make them."""
import json

import pytest
import torch
from diffusers import AmusedPipeline
from safetensors.torch import load_file

from flowgrpo.config import ConfigError, make_config
from flowgrpo.policies.mdm import MaskedDiffusionPolicy
from flowgrpo.policies.schedule import SchedulePolicy
from flowgrpo.pretrain.mdm_model import MDMSpec, build_mdm_pipeline
from flowgrpo.rewards.pairwise import PointwiseAsPairwise
from flowgrpo.settings import BatchLayout
from flowgrpo.strategies import ImageScoring
from flowgrpo.train import build_trainer, make_task
from flowgrpo.trainer import Plan, Trainer
from tests.helpers import single

TINY = MDMSpec(hidden_size=16, num_layers=1, heads=2, block_channels=8, embed_channels=8)
ROWS = [{"prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
        {"prompt": "a photo of two squares", "tag": "counting", "include": [{"class": "square", "count": 2}]}]


def grey_share(images, prompts, metadata):
    """A reward that varies between any two images: the share of background-grey pixels."""
    return ((images - 128 / 255).abs().sum(dim=1) < 0.02).float().mean(dim=(1, 2))


grey_share.name = "grey_share"


@pytest.fixture(scope="module")
def tiny_mdm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mdm")
    MaskedDiffusionPolicy(build_mdm_pipeline(TINY), SchedulePolicy.default(4, 3.0), micro_batch=4).save(path)
    return path


def config(tiny_mdm, tmp_path, co_grpo=None, **kw):
    """The shapes-mdm preset on the tiny model; ``co_grpo``: Co-GRPO's own options over the preset's."""
    values = dict(model=str(tiny_mdm), num_steps=4, prompts_per_iter=2, group_size=4, micro_batch=4, lr=1e-2,
                  out=str(tmp_path / "run"), log_with="", judge="", save_every=0,
                  co_grpo={"schedule_lr": 0.1, "model_steps": 0} | (co_grpo or {}))
    return make_config("shapes-mdm", overrides=values | kw)


def trainer(cfg, reward=grey_share, judge=None) -> Trainer:
    return build_trainer(cfg, single(), ImageScoring(reward, judge, cfg.pointwise_weight))


def params(t: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    policy = t.task.policy
    return {part: {n: p.detach().clone() for n, p in getattr(policy, part).named_parameters()}
            for part in ("transformer", "schedule")}


@pytest.mark.parametrize("mode,train_steps", [("model", 0), ("schedule", 0), ("joint", 0), ("joint", 2)])
def test_importance_ratio_is_one_on_the_first_inner_step(tiny_mdm, tmp_path, mode, train_steps):
    t = trainer(config(tiny_mdm, tmp_path, {"mode": mode, "model_steps": train_steps}, inner_epochs=2))
    ro = t.task.rollout(t.plan(ROWS))
    policy = t.task.policy
    sampled = ro.sampled_log_probs()
    checked = 0
    for chunk in policy.chunks(ro, slice(0, 8), 4):
        logp, _ = policy.log_prob(ro, chunk)
        assert (logp.detach() - sampled[chunk.rows, chunk.cols]).abs().max() < 1e-5
        checked += logp.numel()
    model_steps = train_steps or 4  # the model trains on train_steps of the 4 steps (0 = all), the schedule on all
    expected = {"model": 8 * model_steps, "schedule": 8 * 4, "joint": 8 * (model_steps + 4)}[mode]
    assert checked == expected  # every trained column of every row, each once
    m = t.step(ROWS)  # the update's first epoch recomputes the sampled log-probs before its optimizer step
    assert m["sampler_logp_max_diff"] < 1e-5 and m["loss"] != 0 and m["ratio_max"] > m["ratio_min"]


def test_each_mode_trains_only_its_part(tiny_mdm, tmp_path):
    for mode, frozen, moved in (("schedule", "transformer", "schedule"), ("model", "schedule", "transformer"),
                                ("joint", None, "both")):
        t = trainer(config(tiny_mdm, tmp_path / mode, {"mode": mode}))
        before = params(t)
        for _ in range(2):
            t.step(ROWS)
        after = params(t)
        for part in ("transformer", "schedule"):
            changed = any(not torch.equal(before[part][n], after[part][n]) for n in before[part])
            assert changed == (part != frozen), (mode, part)
        assert set(t.task.policy.trainable_state_dict()) == {
            f"{part}.{n}" for part in ("transformer", "schedule") if part != frozen for n in before[part]}


def test_resume_and_export_reproduce_model_and_schedule_exactly(tiny_mdm, tmp_path):
    straight = trainer(config(tiny_mdm, tmp_path / "a"))
    for _ in range(2):
        straight.step(ROWS)
    first = trainer(config(tiny_mdm, tmp_path / "b"))
    first.step(ROWS)
    first.save()
    resumed = trainer(config(tiny_mdm, tmp_path / "b"))
    assert resumed.resume() is not None and resumed.state.iteration == 1
    resumed.step(ROWS)
    a, b = straight.task.policy.trainable_state_dict(), resumed.task.policy.trainable_state_dict()
    assert a.keys() == b.keys() and any(k.startswith("schedule.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the exported pipeline holds both parts and samples the same images
    policy = resumed.task.policy
    policy.save(tmp_path / "export")
    AmusedPipeline.from_pretrained(tmp_path / "export")  # plain diffusers reads it
    again = MaskedDiffusionPolicy.from_pretrained(tmp_path / "export", micro_batch=4)
    saved = {f"{part}.{n}": p for part in ("transformer", "schedule")
             for n, p in getattr(again, part).named_parameters()}
    assert all(torch.equal(saved[k], a[k]) for k in a)
    seeds = torch.tensor([3, 4, 5])
    prompts = [r["prompt"] for r in ROWS] + [""]
    assert torch.equal(policy.generate(prompts, x_init=seeds), again.generate(prompts, x_init=seeds))


def test_kl_starts_at_zero_and_grows_as_both_parts_move(tiny_mdm, tmp_path):
    t = trainer(config(tiny_mdm, tmp_path, beta=0.1))
    kls = [t.step(ROWS)["kl"] for _ in range(3)]
    assert abs(kls[0]) < 1e-7 and kls[2] > 1e-6


@pytest.mark.parametrize("advantage,options,judge", [
    ("grpo", {"scale": "none"}, ""), ("rloo", {}, ""), ("mc_grpo", {}, ""), ("gdpo", {}, ""), ("bnpo", {}, ""),
    ("ngrpo", {}, ""), ("stratified", {"alpha": 0.5}, ""), ("spo", {}, ""), ("grpo", {}, "pairwise")])
def test_every_estimator_and_the_pairwise_judge_train_it(tiny_mdm, tmp_path, advantage, options, judge):
    cfg = config(tiny_mdm, tmp_path, advantage=advantage, advantage_options=options, pointwise_weight=0.5 if judge else 0.0)
    # Pref-GRPO: win rates from a Bradley-Terry judge over the grey share (the verifier judges untrained noise alike)
    t = trainer(cfg, judge=PointwiseAsPairwise(grey_share, 0.05) if judge else None)
    before = params(t)
    m = t.step(ROWS)
    assert m["sampler_logp_max_diff"] < 1e-5 and "skipped" not in m
    assert not torch.equal(before["schedule"]["mean"], params(t)["schedule"]["mean"])
    if judge:
        assert m["adv/winrate_std"] > 0


def test_rollouts_do_not_depend_on_the_number_of_processes(tiny_mdm, tmp_path):
    """Each of 2 ranks rolls out its half of the samples exactly as one process rolls them out."""
    task = trainer(config(tiny_mdm, tmp_path)).task
    rows = [r for r in ROWS for _ in range(4)]
    group_ids = torch.arange(2).repeat_interleave(4)
    out = {}
    for processes in (1, 2):
        layout = BatchLayout(8, processes, 1, 4)
        for rank in range(processes):
            plan = Plan(5, 0, rows, group_ids, layout.local_indices(rank), layout, single())
            out[processes, rank] = task.rollout(plan)
    for field in ("tokens", "commit_step", "actions", "token_logp", "schedule_logp"):
        halves = torch.cat([getattr(out[2, r], field) for r in (0, 1)])
        assert torch.equal(halves, getattr(out[1, 0], field)), field
    assert len({tuple(t.tolist()) for t in out[1, 0].tokens}) == 8  # every sample its own


def test_masked_diffusion_options_are_checked(tiny_mdm, tmp_path):
    with pytest.raises(ConfigError, match="co_grpo.mode 'both'"):
        config(tiny_mdm, tmp_path, {"mode": "both"})
    with pytest.raises(ConfigError, match="strategy g2rpo trains flow-matching models; .* is a masked diffusion model"):
        config(tiny_mdm, tmp_path, strategy="g2rpo", co_grpo={})
    with pytest.raises(ConfigError, match="lora_rank"):
        config(tiny_mdm, tmp_path, lora_rank=4)
    with pytest.raises(ConfigError, match="own schedule of 4 steps; num_steps=6"):
        make_task(config(tiny_mdm, tmp_path, num_steps=6), single(), ImageScoring(grey_share))


def test_train_command_runs_co_grpo_and_evaluates_the_learned_schedule(tiny_mdm, tmp_path):
    from flowgrpo.prompts.shapes import load_split
    from flowgrpo.train import train

    evalf = tmp_path / "eval.jsonl"
    evalf.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::100]))
    summary = train(config(tiny_mdm, tmp_path, iterations=2, eval_every=2, eval_prompts=str(evalf),
                           eval_images_per_prompt=1))
    assert summary["iterations"] == 2 and summary["trained"]["n_images"] == {"single_object": 1, "counting": 1,
                                                                            "position": 1}
    final = MaskedDiffusionPolicy.from_pretrained(tmp_path / "run" / "final")  # the model with its schedule
    weights = load_file(tmp_path / "run" / "checkpoints" / "iter-000002" / "weights.safetensors")
    assert torch.equal(final.schedule.mean, weights["schedule.mean"])
    assert torch.equal(final.transformer.mlm_layer.conv2.weight, weights["transformer.mlm_layer.conv2.weight"])
