"""The Flow-GRPO training path on a tiny Shapes SD3 pipeline: ratio 1, invariances, exact resume."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.checkpoint import CheckpointError
from flowgrpo.config import ConfigError, TrainConfig, make_config
from flowgrpo.core import compute_advantages
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.pretrain.model import TransformerSpec, build_pipeline
from flowgrpo.prompts.shapes import load_split
from flowgrpo.samplers.rollout import group_noise
from flowgrpo.samplers.schedules import offset_schedule
from flowgrpo.settings import budget_progress
from flowgrpo.strategies import STRATEGIES, ImageScoring
from flowgrpo.strategies.g2rpo import coarse_tail, finish_coarse
from flowgrpo.train import draw_prompts, train
from tests.helpers import flow_trainer, make_plan, one_update, strategy_of

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture
def eval_file(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in load_split("test")[::100]))
    return str(p)


def _rollout(policy, generator, guidance=4.5, steps=4):
    entries = [{"prompt": p} for p in PROMPTS for _ in range(4)]
    gids = torch.arange(2).repeat_interleave(4)
    x = group_noise(2, 4, policy.latent_shape(), generator=generator, shared=False)
    sigmas = policy.sigmas(steps)
    return policy.rollout([e["prompt"] for e in entries], entries, gids, x, sigmas=sigmas,
                          sde_mask=torch.ones(steps, dtype=torch.bool), guidance=guidance, kind="flow_sde",
                          noise_level=0.7, generator=generator)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_importance_ratio_is_one_on_the_first_inner_step(tiny_model, guidance):
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    ro = _rollout(policy, torch.Generator().manual_seed(0), guidance)
    for start in (0, 4):
        rows = slice(start, start + 4)
        for j in range(4):
            logp, _, _ = policy.step_log_prob(ro, rows, j, guidance)
            ratio = torch.exp(logp - ro.log_probs[rows, j])
            assert (ratio - 1).abs().max() < 1e-5


def test_bf16_autocast_keeps_ratio_one_and_evaluation_fp32(tiny_model):
    """bf16 rollouts and updates: the recomputed log-probs still equal the sampled ones (same kernels, same
    batch composition); the velocity really is computed in bf16; `precision(None)` gives back the fp32 result."""
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    x, sigma = torch.randn(4, *policy.latent_shape(), generator=torch.Generator().manual_seed(1)), torch.full((4,), 0.6)
    cond = policy.cond(PROMPTS * 2)
    v32 = policy.velocity(x, sigma, cond, 4.5)
    policy.autocast = torch.bfloat16
    v16 = policy.velocity(x, sigma, cond, 4.5)
    assert 1e-4 < (v16 - v32).abs().max() < 0.1 * v32.abs().max()
    with policy.precision(None):
        assert torch.equal(policy.velocity(x, sigma, cond, 4.5), v32)
    assert policy.autocast is torch.bfloat16
    ro = _rollout(policy, torch.Generator().manual_seed(0))
    for start in (0, 4):
        rows = slice(start, start + 4)
        for j in range(4):
            logp, _, _ = policy.step_log_prob(ro, rows, j, 4.5)
            assert (torch.exp(logp - ro.log_probs[rows, j]) - 1).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize(("antithetic", "noise_freqs", "offset"), [(False, 0, 0), (True, 0, 0), (False, 2, 0), (False, 0, 1)])
def test_g2rpo_branches_train_on_their_own_step_with_ratio_one(tiny_model, antithetic, noise_freqs, offset):
    """G²RPO singular sampling: per-row SDE steps; the recomputed log-prob of each row's branch step matches,
    also on an offset schedule (the rollout's own sigmas are used, not the policy's grid)."""
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    cfg = TrainConfig(model=str(tiny_model), prompts_per_iter=2, group_size=4, micro_batch=4, num_steps=4,
                      strategy="g2rpo", sde_steps=3, antithetic=antithetic, noise_freqs=noise_freqs)
    g = torch.Generator().manual_seed(4)
    plan = make_plan([{"prompt": p} for p in PROMPTS], 4, iteration=4)
    strategy = strategy_of(cfg, policy)
    mask = strategy.sde_mask(plan, cfg.num_steps)
    assert mask.shape == (8, 4) and (mask.sum(dim=1) == 1).all() and not mask[:, 3].any()
    assert all(torch.equal(mask[4 * k], mask[4 * k + j]) for k in range(2) for j in range(4))  # one branch per group
    x = group_noise(2, 4, policy.latent_shape(), generator=g, shared=True)
    sigmas = offset_schedule(policy.sigmas(12), 4, offset) if offset else policy.sigmas(4)
    ro = policy.rollout([p for p in PROMPTS for _ in range(4)], [{}] * 8, plan.group_ids, x, sigmas=sigmas,
                        sde_mask=mask, guidance=4.5, kind="flow_sde", noise_level=0.7, generator=g,
                        antithetic=cfg.antithetic, noise_freqs=cfg.noise_freqs)
    assert ro.noise_freqs == noise_freqs
    steps = strategy.train_steps(ro.sde_mask, plan)
    assert torch.equal(steps[:, 0], mask.float().argmax(dim=1))
    for start in (0, 4):
        rows = slice(start, start + 4)
        logp, _, _ = policy.step_log_prob(ro, rows, steps[rows, 0], 4.5)
        ratio = torch.exp(logp - ro.log_probs[rows].gather(1, steps[rows]).squeeze(1))
        assert (ratio - 1).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="needs shared_noise"):
        TrainConfig(strategy="g2rpo", shared_noise=False)
    with pytest.raises(ConfigError, match="group_size=3 must be even"):
        TrainConfig(prompts_per_iter=8, group_size=3, antithetic=True)
    with pytest.raises(ConfigError, match="noise_freqs must be >= 0"):
        TrainConfig(noise_freqs=-1)
    with pytest.raises(ConfigError, match="schedule_jitter must be >= 0"):
        TrainConfig(schedule_jitter=-1)


def _g2rpo_rollout(policy, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    plan = make_plan([{"prompt": p} for p in PROMPTS], 4, iteration=seed)
    x = group_noise(2, 4, policy.latent_shape(), generator=g, shared=True)
    return policy.rollout([p for p in PROMPTS for _ in range(4)], [{}] * 8, plan.group_ids, x,
                          sigmas=policy.sigmas(cfg.num_steps), sde_mask=strategy_of(cfg, policy).sde_mask(plan, cfg.num_steps),
                          guidance=4.5, kind="flow_sde", noise_level=0.7, generator=g)


def test_multi_granularity_finishes_each_branch_on_the_coarse_schedule(tiny_model):
    """Granularity 1 reproduces the sampled images; granularity 2 equals Euler steps taken by hand from the
    branch's x_{k+1} over σ[k+1], σ[k+2], σ[k+4], …, 0."""
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    cfg = TrainConfig(model=str(tiny_model), prompts_per_iter=2, group_size=4, micro_batch=4, num_steps=6,
                      strategy="g2rpo", sde_steps=3, strategy_options={"granularities": 2})
    ro = _g2rpo_rollout(policy, cfg, seed=5)
    assert torch.allclose(finish_coarse(policy, ro, 1), ro.images, atol=1e-5)
    coarse = finish_coarse(policy, ro, 2)
    assert (coarse - ro.images).abs().max() > 1e-3
    for row in (0, 4):
        k = int(ro.sde_mask[row].float().argmax())
        grid = coarse_tail(ro.sigmas, k, 2)  # hand-checked in test_coarse_tail_hand_computed
        x = ro.latents[row : row + 1, k + 1]
        for a, b in zip(grid[:-1], grid[1:]):
            x = x + (b - a) * policy.velocity(x, a.expand(1), policy.cond([ro.prompts[row]]), 4.5)
        assert torch.allclose(policy.decode(x)[0], coarse[row], atol=1e-5)
    with pytest.raises(ValueError, match="one SDE"):
        finish_coarse(policy, _rollout(policy, torch.Generator().manual_seed(0)), 2)


def test_multi_granularity_advantages_sum_each_granularity(tiny_model, tmp_path):
    """G²RPO's advantages = the advantages of the sampled images + those of the coarse-finished ones."""
    cfg = TrainConfig(model=str(tiny_model), prompts_per_iter=2, group_size=4, micro_batch=4, num_steps=6,
                      strategy="g2rpo", sde_steps=3, strategy_options={"granularities": 2}, out=str(tmp_path),
                      log_with="")
    trainer = flow_trainer(cfg)
    task, policy = trainer.task, trainer.task.policy

    def reward_fn(images, prompts, metadata):  # any image statistic will do
        return images.mean(dim=(1, 2, 3))

    task.scoring = ImageScoring(reward_fn)
    ro = _g2rpo_rollout(policy, cfg, seed=6)
    plan = make_plan([{"prompt": p} for p in PROMPTS], 4, iteration=6)
    adv = task.advantages(ro, reward_fn(ro.images, None, None), plan, trainer)
    a1 = compute_advantages("grpo", reward_fn(ro.images, None, None), ro.group_ids)
    a2 = compute_advantages("grpo", reward_fn(finish_coarse(policy, ro, 2), None, None), ro.group_ids)
    total = a1.advantages + a2.advantages
    assert torch.allclose(adv.advantages, total.clamp(-cfg.adv_clip, cfg.adv_clip), atol=1e-6)
    assert "reward_granularity2" in adv.stats
    # the sum is clipped once, as G²RPO's code clamps it: at a clip of 1.5 some sums exceed it, no single term does
    trainer.cfg = replace(cfg, adv_clip=1.5)
    clipped = task.advantages(ro, reward_fn(ro.images, None, None), plan, trainer)
    assert torch.allclose(clipped.advantages, total.clamp(-1.5, 1.5), atol=1e-6)
    assert float(total.abs().max()) > 1.5 and float(clipped.advantages.abs().max()) == pytest.approx(1.5)
    each = a1.advantages.clamp(-1.5, 1.5) + a2.advantages.clamp(-1.5, 1.5)  # clipping each term, then the sum
    assert float(each.abs().max()) > 1.5 + 1e-3
    assert clipped.stats["frac_clipped"] == pytest.approx(float((total.abs() > 1.5).double().mean()))
    with pytest.raises(ConfigError, match=r"--g2rpo.granularities \(an option of strategy g2rpo\): this run's strategy "
                                          "is flow_grpo"):
        make_config(overrides={"strategy": "flow_grpo", "g2rpo.granularities": 2})
    with pytest.raises(ConfigError, match="unknown option.*'granularities'.* of strategy flow_grpo"):
        TrainConfig(strategy="flow_grpo", strategy_options={"granularities": 2})
    with pytest.raises(ConfigError, match="per-prompt statistics"):
        TrainConfig(advantage="spo", judge="", strategy_options={"granularities": 3})


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it was asked to apply."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_update_gradient_does_not_depend_on_micro_batching(tiny_model):
    # float64, so that what is compared is the maths and not float32 rounding of other batch shapes.
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, dtype=torch.float64)
    params = policy.trainable_parameters()
    ro = _rollout(policy, torch.Generator().manual_seed(1))
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 1.0, 0.0, 0.5, 0.5])
    adv = compute_advantages("grpo", rewards, ro.group_ids)
    steps = torch.arange(4)
    grads = {}
    for mb in (8, 4, 2):
        cfg = TrainConfig(prompts_per_iter=2, group_size=4, micro_batch=mb, optimizer_steps=1, loss_agg="token-mean")
        opt = RecordingAdamW(params, lr=0.0)
        one_update(policy, opt, ro, adv, steps, cfg)
        grads[mb] = opt.seen
    ref = torch.cat([g.flatten() for g in grads[8]])
    assert ref.norm() > 0
    for mb in (4, 2):
        other = torch.cat([g.flatten() for g in grads[mb]])
        assert (other - ref).norm() / ref.norm() < 1e-9


def test_beta_zero_never_builds_the_reference_and_kl_starts_at_zero(tiny_model):
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    params = policy.trainable_parameters()
    ro = _rollout(policy, torch.Generator().manual_seed(2))
    adv = compute_advantages("grpo", torch.rand(8, generator=torch.Generator().manual_seed(0)), ro.group_ids)
    opt = torch.optim.AdamW(params, lr=1e-3)
    base = dict(prompts_per_iter=2, group_size=4, micro_batch=4, optimizer_steps=2)
    stats = one_update(policy, opt, ro, adv, torch.arange(4), TrainConfig(beta=0.0, **base))
    assert policy._reference is None and "kl" not in stats
    policy2 = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    params2 = policy2.trainable_parameters()
    stats = one_update(policy2, torch.optim.AdamW(params2, lr=1e-3), ro, adv, torch.arange(4),
                       TrainConfig(beta=0.1, optimizer_steps=1, **{k: v for k, v in base.items() if k != "optimizer_steps"}))
    assert policy2._reference is not None and stats["kl"] == pytest.approx(0.0, abs=1e-12)  # one step: policy == ref


def test_train_only_updates_the_matching_parameters_and_nothing_else(tiny_model, tmp_path, eval_file):
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    names = policy.train_only(r"context_embedder|text_embedder")
    assert names == ["time_text_embed.text_embedder.linear_1.weight", "time_text_embed.text_embedder.linear_1.bias",
                     "time_text_embed.text_embedder.linear_2.weight", "time_text_embed.text_embedder.linear_2.bias",
                     "context_embedder.weight", "context_embedder.bias"]
    before = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    params = policy.trainable_parameters()
    assert len(params) == 6
    ro = _rollout(policy, torch.Generator().manual_seed(3))
    adv = compute_advantages("grpo", torch.rand(8, generator=torch.Generator().manual_seed(1)), ro.group_ids)
    one_update(policy, torch.optim.AdamW(params, lr=1e-2), ro, adv, torch.arange(4),
               TrainConfig(prompts_per_iter=2, group_size=4, micro_batch=4, beta=0.1))
    changed = {n for n, p in policy.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    # a run saves and restores just that subset
    train(_cfg(tiny_model, tmp_path / "run", eval_file, 1, trainable="context_embedder"))
    assert set(load_file(tmp_path / "run" / "checkpoints" / "iter-000001" / "weights.safetensors")) == {
        "context_embedder.weight", "context_embedder.bias"}
    assert train(_cfg(tiny_model, tmp_path / "run", eval_file, 2, trainable="context_embedder"))["iterations"] == 2
    with pytest.raises(ValueError, match="matches no transformer parameter"):
        FlowPolicy.from_pretrained(tiny_model).train_only("text_encoder")
    with pytest.raises(ConfigError, match="is not a regular expression"):
        TrainConfig(trainable="(")
    with pytest.raises(ConfigError, match="only the LoRA adapters train"):
        TrainConfig(trainable="proj_out", lora_rank=4)


def _cfg(model, out, evalf, iterations, **kw):
    return TrainConfig(model=str(model), out=str(out), eval_prompts=evalf, iterations=iterations, prompts_per_iter=2,
                       group_size=4, micro_batch=4, num_steps=3, eval_num_steps=3, eval_images_per_prompt=1,
                       eval_every=100, save_every=1, log_with="", ema_decay=0.9, **kw)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_model, tmp_path, eval_file):
    # the decay is set by the run's iteration budget; the schedule's offsets are keyed by (seed, iteration)
    sched = dict(lr_schedule="linear", lr_final=0.25, max_minutes=0, schedule_jitter=2)
    straight = train(_cfg(tiny_model, tmp_path / "a", eval_file, 3, **sched))
    train(_cfg(tiny_model, tmp_path / "b", eval_file, 1, **sched))
    resumed = train(_cfg(tiny_model, tmp_path / "b", eval_file, 3, **sched))
    assert straight["iterations"] == resumed["iterations"] == 3
    last = lambda run: tmp_path / run / "checkpoints" / "iter-000003"  # noqa: E731
    for f in ("weights.safetensors", "ema.safetensors"):
        assert (last("a") / f).read_bytes() == (last("b") / f).read_bytes()  # 1 + 2 iterations == 3 straight
    sa = json.loads((last("a") / "state.json").read_text())
    sb = json.loads((last("b") / "state.json").read_text())
    ra = [h["reward_mean"] for h in sa["history"]["train"]]
    rb = [h["reward_mean"] for h in sb["history"]["train"]]
    assert ra == rb
    lr = TrainConfig().lr
    assert [h["lr"] for h in sb["history"]["train"]] == pytest.approx([lr, lr * 0.75, lr * 0.5])
    assert (tmp_path / "a" / "eval" / "base" / "grid.png").is_file()
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| base |" in report and "| trained (3 it) |" in report and "Failed requirements" in report
    assert (tmp_path / "a" / "final" / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["iter-000002", "iter-000003"]  # keep=2
    ema = load_file(last("a") / "ema.safetensors")
    exported = FlowPolicy.from_pretrained(tmp_path / "a" / "final").transformer
    assert all(torch.equal(p, ema[n]) for n, p in exported.named_parameters())  # the export is the average


def test_full_export_samples_like_the_policy(tiny_model, tmp_path):
    """The exported pipeline carries the family options it was trained with (the Shapes model's T5 length of 1):
    loaded back, it generates the same images; with the default options it would not."""
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, family_options={"max_sequence_length": 1})
    policy.save(tmp_path / "export")
    again = FlowPolicy.from_pretrained(tmp_path / "export", micro_batch=4)
    assert again.family.max_sequence_length == 1

    def images(p):
        return p.generate(PROMPTS, num_steps=2, guidance=4.5, generator=torch.Generator().manual_seed(0))

    assert torch.equal(images(again), images(policy))
    assert not torch.allclose(images(FlowPolicy.from_pretrained(tiny_model, micro_batch=4)), images(policy))


def test_bad_checkpoints_are_refused_clearly(tiny_model, tmp_path, eval_file):
    train(_cfg(tiny_model, tmp_path / "run", eval_file, 1))
    ckpt = tmp_path / "run" / "checkpoints" / "iter-000001"
    trainer = flow_trainer(_cfg(tiny_model, tmp_path / "other", eval_file, 1))
    state = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(state.replace('"iteration": 1', '"iteration": 7'))
    with pytest.raises(CheckpointError, match=r"iter-000001: state.json is corrupt .* checksum differs"):
        trainer.load(ckpt)
    (ckpt / "state.json").write_text(state)
    trainer.load(ckpt)  # intact again
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="iter-000001: optimizer.pt is missing"):
        trainer.load(ckpt)
    other = tmp_path / "bigger"
    build_pipeline(TransformerSpec(num_layers=2, attention_head_dim=8, num_attention_heads=2)).save_pretrained(other)
    train(_cfg(tiny_model, tmp_path / "run2", eval_file, 1))
    with pytest.raises(CheckpointError, match="does not match the model's trainable parameters"):
        flow_trainer(_cfg(other, tmp_path / "o2", eval_file, 1)).load(tmp_path / "run2" / "checkpoints" / "iter-000001")


def test_learning_rate_schedules_by_hand():
    cfg = TrainConfig(lr=1.0, lr_final=0.2, iterations=100, max_minutes=10)
    assert budget_progress(25, 0.0, 100, 10) == 0.25
    assert budget_progress(25, 450.0, 100, 10) == 0.75  # 7.5 of 10 minutes: the time budget runs out first
    assert budget_progress(100, 900.0, 100, 10) == 1.0
    assert budget_progress(25, 1e9, 100, 0) == 0.25
    assert cfg.scheduled_lr(0.5) == 1.0  # constant
    linear, cosine = replace(cfg, lr_schedule="linear"), replace(cfg, lr_schedule="cosine")
    assert [linear.scheduled_lr(p) for p in (0, 0.5, 1)] == pytest.approx([1.0, 0.6, 0.2])
    assert [cosine.scheduled_lr(p) for p in (0, 0.25, 0.5, 1)] == pytest.approx([1.0, 0.2 + 0.8 * 0.8535534, 0.6, 0.2])
    with pytest.raises(ConfigError, match="lr_schedule 'step' is not one of"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match=r"lr_final must be in \[0, 1\], got 1.5"):
        TrainConfig(lr_final=1.5)


def test_tag_weights_set_how_often_each_tag_is_drawn():
    train_entries = load_split("train")
    cfg = TrainConfig(prompts_per_iter=8000, group_size=2, micro_batch=16)
    tags = lambda c, it: [e["tag"] for e in draw_prompts(train_entries, c, it)]  # noqa: E731
    uniform = tags(cfg, 0)
    assert uniform.count("counting") / 8000 == pytest.approx(1 / 6, abs=0.02)  # binomial SE 0.004
    weighted = tags(replace(cfg, tag_weights={"counting": 3, "colors": 0.5}), 0)
    assert weighted.count("counting") / 8000 == pytest.approx(3 / 7.5, abs=0.02)
    assert weighted.count("colors") / 8000 == pytest.approx(0.5 / 7.5, abs=0.02)
    assert weighted.count("position") / 8000 == pytest.approx(1 / 7.5, abs=0.02)
    assert tags(replace(cfg, tag_weights={}), 5) == tags(cfg, 5)  # no weights: the same draws as before the option
    assert tags(cfg, 5) != tags(cfg, 6) and tags(replace(cfg, seed=1), 5) != tags(cfg, 5)  # keyed by seed, iteration
    with pytest.raises(ConfigError, match=r"tag_weights: unknown tag\(s\) \['count'\]; tags are single_object"):
        make_config("shapes", overrides={"tag_weights": "{count: 3}"})
    with pytest.raises(ConfigError, match="tag_weights must be positive numbers, got {'counting': 0}"):
        make_config("shapes", overrides={"tag_weights": "{counting: 0}"})


def test_bad_reward_options_and_prompt_files_stop_train_before_it_touches_the_run(tmp_path, capsys):
    from flowgrpo.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # an earlier run's config must survive a mistyped command
    cases = [(["--reward-options", "{mode:strict}"], "reward 'shapes' got unknown option(s) ['mode:strict']; accepted options: mode, form_weight, exact"),
             (["--reward-options", "{mode: strcit}"], "ShapesReward mode must be one of ('partial', 'gated', 'strict'), got 'strcit'"),
             (["--judge", "shapes", "--judge-options", "{temp: 1}"], "judge 'shapes' got unknown option(s) ['temp']"),
             (["--reward", "clip"], "unknown reward 'clip'; known rewards: aesthetic, "),  # other tests register more
             (["--prompts", str(tmp_path / "missing.txt")], "prompt file not found")]
    for extra, message in cases:
        assert main(["train", "--out", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flowgrpo train: error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"] and (run / "config.json").read_text() == "{}"


def test_config_validation_names_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"12 x 8 = 96: each of 1 process\(es\) holds 96 samples per optimizer step "
                                          r"\(optimizer_steps=1\), not a multiple of micro_batch=20"):
        TrainConfig(micro_batch=20)
    with pytest.raises(ConfigError, match=r"6 x 8 = 48: each of 1 process\(es\) holds 24 samples per optimizer step "
                                          r"\(optimizer_steps=2\), not a multiple of micro_batch=16"):
        TrainConfig(micro_batch=16, prompts_per_iter=6, group_size=8, optimizer_steps=2)
    cfg = TrainConfig()  # 96 samples: 2 processes hold 48 each (2 forward passes of 24), 5 processes cannot split them
    assert (cfg.layout(2).per_process, cfg.layout(2).micro_batches_per_step) == (48, 2)
    with pytest.raises(ConfigError, match=r"= 96 do not split evenly over 5 process\(es\) x optimizer_steps=1"):
        cfg.layout(5)
    with pytest.raises(ConfigError, match=r"each of 3 process\(es\) holds 32 samples per optimizer step "
                                          r"\(optimizer_steps=1\), not a multiple of micro_batch=24"):
        cfg.layout(3)
    with pytest.raises(ConfigError, match=r"--dance-grpo.timestep-fraction \(an option of strategy dance_grpo\): this "
                                          "run's strategy is g2rpo"):
        make_config("shapes", overrides={"dance_grpo.timestep_fraction": 0.5})
    with pytest.raises(ConfigError, match="unknown option"):
        make_config("shapes", overrides={"learning_rate": 1})
    with pytest.raises(ConfigError, match="needs --model PATH"):
        make_config("sd35-medium")
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.001\nguidance: 2\n")
    cfg = make_config("shapes", str(y), {"guidance": "3.5"})
    assert cfg.lr == 0.001 and cfg.guidance == 3.5
    assert cfg.judge == "shapes" and cfg.strategy == "g2rpo"  # the preset: Pref-GRPO win rates, singular sampling
    assert make_config("shapes", overrides={"judge": ""}).judge == ""  # pointwise advantages
    assert make_config("sd35-medium", overrides={"model": "m"}).strategy == "flow_grpo"
    y.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        make_config("shapes", str(y))
    with pytest.raises(ConfigError, match="cannot read 'fast' as float"):
        make_config("shapes", overrides={"lr": "fast"})


def test_train_help_explains_every_option(capsys):
    import argparse
    from dataclasses import fields

    from flowgrpo.commands import register

    parser = argparse.ArgumentParser(prog="flowgrpo")
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f"{f.name} has no help text"
        if f.name != "strategy_options":  # on the command line: each strategy's options under its name
            assert f"--{f.name.replace('_', '-')}" in text
    for name, cls in STRATEGIES.items():
        assert f"strategy {name}: {' '.join(cls.__doc__.split())}" in text
        for f in fields(cls.Options):
            assert len(f.metadata["help"]) > 10 and f"--{name.replace('_', '-')}.{f.name.replace('_', '-')}" in text
    assert "--window-shift-every" not in text  # the old spellings are read, not shown
    assert "k x k lowest DCT frequencies of each latent channel" in text
    # the preset's value, not the dataclass default ('')
    assert "pointwise GRPO advantages (shapes preset: 'shapes')" in text
    args = parser.parse_args(["train", "--noise-freqs", "8", "--antithetic", "true"])
    assert args.noise_freqs == "8" and args.antithetic == "true" and args.lr is None


def test_strategy_options_from_the_command_line_yaml_and_the_old_flat_names(tmp_path):
    cfg = make_config("shapes", overrides={"strategy": "mixgrpo", "mixgrpo.window_shift_every": "3"})
    assert cfg.strategy_options.window_shift_every == 3 and cfg.strategy_options.ode_solver == "euler"
    y = tmp_path / "run.yaml"
    y.write_text("strategy: mixgrpo\nsde_steps: 2\nmixgrpo: {window_end: 4, ode_solver: dpm2}\n")
    cfg = make_config("shapes", str(y), {"mixgrpo.window_end": "5"})  # later sources win, option by option
    assert (cfg.strategy_options.window_end, cfg.strategy_options.ode_solver) == (5, "dpm2")
    assert make_config("shapes-mdm").strategy == "co_grpo"  # the model kind's strategy
    with pytest.warns(FutureWarning, match=r"--window-shift-every \(window_shift_every\) is now "
                                           r"--mixgrpo.window-shift-every"):
        cfg = make_config("shapes", overrides={"strategy": "mixgrpo", "window_shift_every": "3"})
    assert cfg.strategy_options.window_shift_every == 3
    with pytest.warns(FutureWarning, match="is now --co-grpo.model-steps"):  # train_steps meant two things
        assert make_config("shapes-mdm", overrides={"train_steps": 2}).strategy_options.model_steps == 2
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['window'\] of strategy mixgrpo"):
        make_config("shapes", overrides={"strategy": "mixgrpo", "mixgrpo.window": 2})
    with pytest.raises(ConfigError, match="mixgrpo.ode_solver 'rk4' is not one of"):
        make_config("shapes", overrides={"strategy": "mixgrpo", "mixgrpo.ode_solver": "rk4"})


def test_an_old_option_name_on_the_command_line_warns_in_one_line(tmp_path, capsys):
    from flowgrpo.cli import main

    assert main(["train", "--strategy", "flow_grpo", "--window-shift-every", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowgrpo train: warning: --window-shift-every (window_shift_every) is now "
                   "--mixgrpo.window-shift-every (mixgrpo: {window_shift_every: ...} in YAML); the old name is read "
                   "for one more release",
                   "flowgrpo train: error: --mixgrpo.window-shift-every (an option of strategy mixgrpo): this run's "
                   "strategy is flow_grpo"]


def test_sample_reports_a_missing_model_in_one_line_and_old_spellings_warn(tmp_path, capsys):
    from flowgrpo.cli import main

    assert main(["sample", "--model", str(tmp_path / "nonexistent"), "--prompt", "a photo of a circle", "--n", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowgrpo sample: warning: --n is now --images-per-prompt; the old spelling is read for one more "
                   "release",
                   f"flowgrpo sample: error: {tmp_path / 'nonexistent'} is not a diffusers pipeline directory (no "
                   "model_index.json)"]
    assert not (tmp_path / "out").exists()


def test_tensorboard_gets_the_metrics_every_evaluations_grid_and_the_curve(tiny_model, tmp_path, eval_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(replace(_cfg(tiny_model, out, eval_file, 2), log_with="tensorboard", eval_every=1))
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert {"eval/grid", "eval/curve"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("eval/curve")] == [1, 2]
    assert {"reward_mean", "eval/overall"} <= set(events.Tags()["scalars"])
    assert (out / "eval" / "curve.png").is_file() and (out / "eval" / "iter00002" / "grid.png").is_file()


def test_eval_guidance_reports_the_base_and_trained_models_at_both_scales(tiny_model, tmp_path, eval_file):
    """--eval-guidance 1 evaluates the base and the final model CFG-free beside --guidance 4.5: the same images a run
    at --guidance 1 evaluates (same noise), both in the summary, the report and the grids."""
    both = train(_cfg(tiny_model, tmp_path / "both", eval_file, 1, guidance=4.5, eval_guidance=1.0))
    free = train(_cfg(tiny_model, tmp_path / "free", eval_file, 1, guidance=1.0))
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN == NaN)
    assert same(both["base_at_eval_guidance"], free["base"])  # every score, guard and image statistic
    grid = lambda run, name: (tmp_path / run / "eval" / name / "grid.png").read_bytes()  # noqa: E731
    assert grid("both", "base-cfg1") == grid("free", "base") != grid("both", "base")  # CFG changes the images
    assert (both["guidance"], both["eval_guidance"], both["trained_at_eval_guidance"]["iteration"]) == (4.5, 1.0, 1)
    report = (tmp_path / "both" / "report.md").read_text()
    assert "| base (CFG 1) |" in report and "| trained (1 it, CFG 4.5) |" in report
    assert (tmp_path / "both" / "eval" / "iter00001-cfg1" / "grid.png").is_file()
    with pytest.raises(ConfigError, match="eval_guidance"):
        TrainConfig(eval_guidance=-1.0)


# Flow-GRPO's geneval_sd3 (config/grpo.py over config/base.py, scripts/train_sd3.py at ac4c86e), value by value:
# 32 GPUs x 9 per batch over 24 images per prompt is 12 prompts a batch, 4 batches = 48 prompts an epoch, gradient
# accumulation over half of them = 2 optimizer steps; int(10 x 0.99) = 9 trained steps.
FLOW_GRPO_GENEVAL_SD3 = dict(
    strategy="flow_grpo", num_steps=10, eval_num_steps=40, guidance=4.5, height=512, width=512, sde_steps=9,
    noise_level=0.7, group_size=24, prompts_per_iter=48, micro_batch=9, optimizer_steps=2, inner_epochs=1,
    lr=3e-4, weight_decay=1e-4, grad_clip=1.0, clip_low=1e-4, clip_high=1e-4, adv_clip=5.0, beta=0.04,
    kl_convention="flow_grpo", advantage="grpo", advantage_options={"scale": "batch"}, zero_std="drop",
    lora_rank=32, lora_alpha=64, ema_decay=0.9 ** 0.25,
)


def test_the_sd35_medium_preset_is_flow_grpos_geneval_recipe():
    cfg = make_config("sd35-medium", overrides={"model": "m"})
    assert {k: getattr(cfg, k) for k in FLOW_GRPO_GENEVAL_SD3} == FLOW_GRPO_GENEVAL_SD3
    assert cfg.layout(1).rows_per_step == 48 * 24 // 2  # 576 samples per optimizer step, as 32 GPUs x 9 x 2
