"""DenseGRPO's dense rewards and noise calibration, MixGRPO's sliding window and its second-order solver."""
import json
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.config import ConfigError, TrainConfig
from flowgrpo.media import to_uint8
from flowgrpo.policies.families import dpm_flow_sigmas
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.rewards import build_reward
from flowgrpo.samplers.rollout import sample_trajectory
from flowgrpo.samplers.steps import dpm2_step
from flowgrpo.strategies.dense_grpo import calibrate_noise, complete, dense_rewards
from flowgrpo.strategies.mixgrpo import compressed_tail
from tests.helpers import flow_trainer, make_plan, strategy_of

PROMPTS = load_split("train")[:3]


def _cfg(model, tmp_path, strategy_options=None, **kw):
    base = dict(model=str(model), out=str(tmp_path), log_with="", prompts_per_iter=3, group_size=4, micro_batch=4,
                num_steps=6, sde_steps=3, judge="", reward="shapes", beta=0.0, strategy_options=strategy_options or {})
    return TrainConfig(**(base | kw))


# ---- DenseGRPO ----------------------------------------------------------------------------------------------------
def test_completions_of_an_ode_trajectory_are_its_final_images(tiny_model):
    """With no noise (every step ODE) each R_t's completion ODE(x_t -> 0) on the rollout's own schedule is the
    rollout itself, so every R_t equals the final reward (float64: the same maths in other calls)."""
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, dtype=torch.float64)
    prompts = [e["prompt"] for e in PROMPTS for _ in range(2)]
    x = torch.randn(6, *policy.latent_shape(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ro = policy.rollout(prompts, [e for e in PROMPTS for _ in range(2)], torch.arange(3).repeat_interleave(2), x,
                        sigmas=policy.sigmas(5), sde_mask=torch.zeros(5, dtype=torch.bool), guidance=4.5,
                        kind="flow_sde", noise_level=0.0)
    completed = complete(policy, ro, [0, 1, 2, 3, 4])
    assert completed.shape == (6, 5, *ro.images.shape[1:])
    for j in range(5):
        assert torch.allclose(completed[:, j], ro.images, atol=1e-10, rtol=0)
    reward = build_reward("shapes")
    final = reward(ro.images, prompts, ro.metadata)
    for j in range(5):
        assert torch.equal(reward(completed[:, j], prompts, ro.metadata), final)


def test_dense_rewards_telescope_to_the_final_reward_minus_the_ode_from_the_initial_noise(tmp_path):
    """A dense_grpo rollout of the shipped model (SDE on steps 0-2 of 6): the per-step gains sum to
    R_final - R(ODE from x_0), and R(ODE from x_0) is the reward of the plain ODE sample from the same initial noise."""
    trainer = flow_trainer(_cfg(SHAPES_MODEL, tmp_path, strategy="dense_grpo", reward="shapes",
                                reward_options={"form_weight": 0.5}))
    task, plan = trainer.task, trainer.plan(PROMPTS)
    ro = task.rollout(plan)
    steps = ro.train_steps[0].tolist()
    assert steps == [0, 1, 2]
    images = complete(task.policy, ro, [0, 1, 2])
    values = {t: task.scoring.value(type(ro)(**{**ro.__dict__, "images": images[:, t]}), plan) for t in range(3)}
    values[3] = task.scoring.value(ro, plan)
    dense = dense_rewards(values, steps)
    assert torch.allclose(dense.sum(dim=1), values[3] - values[0], atol=1e-12)
    assert dense.abs().sum() > 0  # the SDE steps move the rewards
    ode = task.policy.generate(ro.prompts, num_steps=6, guidance=4.5, x_init=ro.latents[:, 0])
    assert torch.allclose(ode, images[:, 0], atol=1e-4)
    adv = task.advantages(ro, task.score(ro, plan), plan, trainer)
    assert adv.advantages.shape == (12, 3)  # one advantage per sample and step
    for j in range(3):  # normalised per step within each group
        for g in range(3):
            col = adv.advantages[4 * g : 4 * g + 4, j].double()
            assert abs(float(col.mean())) < 1e-6 and (float(col.std(correction=0)) in (0.0,) or
                                                       abs(float(col.std(correction=0)) - 1) < 1e-3)


def test_calibration_raises_the_noise_of_balanced_steps_and_lowers_the_others():
    dense = torch.tensor([[0.2, -0.1, 0.0],
                          [-0.3, -0.2, 0.1],
                          [0.1, -0.4, 0.0],
                          [-0.1, 0.0, -0.2]])  # step 0: 2+ 2- (balanced); step 1: 0+ 3- ; step 2: 1+ 1- (zeros don't count)
    psi = calibrate_noise([1.0, 1.0, 1.0, 1.0], dense, [0, 1, 2], balance=2, step=0.01)
    assert psi == pytest.approx([1.01, 0.99, 1.01, 1.0])  # step 3 is not an SDE step: untouched
    assert calibrate_noise([0.01, 1.0], dense[:, :2], [0, 1], balance=1, step=0.01)[1] == pytest.approx(0.99)
    assert calibrate_noise([0.01], dense[:, 1:2], [0], balance=2, step=0.01) == [0.01]  # never below one step


def test_dense_noise_scale_is_calibrated_then_frozen_resumed_logged_and_plotted(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", {"calibrate_iterations": 2}, strategy="dense_grpo", save_every=1,
               eval_prompts="shapes:test")
    trainer = flow_trainer(cfg)
    for it in range(3):
        trainer.step(PROMPTS)
    psi = trainer.task.psi
    hist = [[h[f"psi/step{t}"] for t in range(3)] for h in trainer.state.history["train"]]
    assert hist[1] == hist[2] == psi[:3] and hist[0] != hist[1]  # moved by calibration rounds 1 and 2 only
    assert [abs(round((p - 1) / 0.01)) for p in psi[:3]] == [2, 2, 2] or any(abs(p - 1) < 1e-9 for p in psi[:3])
    assert psi[3:] == [1.0] * 3  # only SDE steps are calibrated
    trainer.save()
    again = flow_trainer(cfg)
    again.resume()
    assert again.task.psi == psi
    trainer.task.report(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "noise_scale.json").read_text())["psi"] == psi
    assert (tmp_path / "run" / "noise_scale.png").is_file()
    with pytest.raises(ConfigError, match="dense_grpo normalises one reward per step"):
        TrainConfig(strategy="dense_grpo", advantage="spo", judge="")


# ---- MixGRPO ------------------------------------------------------------------------------------------------------
def test_mixgrpo_window_slides_trains_its_steps_and_resumes_at_the_same_position(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", {"window_shift_every": 2, "window_stride": 1, "window_end": 4},
               strategy="mixgrpo", sde_steps=2, save_every=1)
    trainer = flow_trainer(cfg)
    starts = []
    for _ in range(4):
        plan = trainer.plan(PROMPTS)
        ro = trainer.task.rollout(plan)
        starts.append(int(ro.train_steps[0, 0]))
        assert ro.sde_mask.tolist() == [starts[-1] <= t < min(starts[-1] + 2, 4) for t in range(6)]
        trainer.step(PROMPTS)
    # every 2 iterations one step later, its steps before step 4, truncated there, then back to 0
    assert starts == [0, 0, 1, 1] and [h["window_start"] for h in trainer.state.history["train"]] == [0, 0, 1, 1]
    trainer.save()
    again = flow_trainer(cfg)
    again.resume()
    later = [again.step(PROMPTS) for _ in range(6)]
    assert [m["window_start"] for m in later] == [2.0, 2.0, 3.0, 3.0, 0.0, 0.0]
    assert [m["window_steps"] for m in later] == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]


def test_mixgrpo_flash_schedule_and_solver_keep_the_ratio_and_compress_after_the_window(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, {"ode_solver": "dpm2", "ode_compress": 0.4}, strategy="mixgrpo", num_steps=10,
               sde_steps=2)
    trainer = flow_trainer(cfg)
    plan = make_plan(PROMPTS, 4)
    ro = trainer.task.rollout(plan)
    assert torch.equal(ro.sigmas, compressed_tail(trainer.task.policy.sigmas, 10, 2, 0.4))
    assert len(ro.sigmas) == 2 + 2 + 1  # int((10 - 2 + 1) x 0.4) - 1 = 2 steps after the window
    m = trainer.step(PROMPTS)
    assert abs(m["ratio_min"] - 1) < 1e-5 and abs(m["ratio_max"] - 1) < 1e-5


def _sd3_grid(shift: float):
    def grid(n: int) -> torch.Tensor:
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        return shift * t / (1 + (shift - 1) * t)
    return grid


def test_compressed_tail_hand_computed_and_equal_to_the_references_rebuilt_schedule():
    linear = _sd3_grid(1.0)  # 1, 0.9, ..., 0
    # int((10 - 4 + 1) x 0.4) - 1 = 1 step from 0.6 to 0
    assert compressed_tail(linear, 10, 4, 0.4).tolist() == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.0])
    assert compressed_tail(linear, 10, 2, 0.5).tolist() == pytest.approx([1.0, 0.9, 0.8, 1.6 / 3, 0.8 / 3, 0.0])  # 3 steps
    assert torch.allclose(compressed_tail(linear, 10, 4, 1.0), linear(10), atol=1e-12)  # r = 1: the grid itself
    # fastvideo/utils/sampling_utils.py: num_post_steps = int(max((N - 1 - L) x r, 1)) points from the unshifted
    # time of step L + 1 to 0, time-shifted (N = T + 1 sigmas, L = the last SDE step = end - 1)
    grid, T, r = _sd3_grid(3.0), 25, 0.4
    short = []
    for end in range(1, T):
        points = int(max((T + 1 - 1 - (end - 1)) * r, 1))
        t_end = float(torch.linspace(1, 0, T + 1)[end])
        post = torch.linspace(t_end, 0, points, dtype=torch.float64)
        reference = torch.cat([grid(T)[:end], 3.0 * post / (1 + 2.0 * post)])
        ours = compressed_tail(grid, T, end, r)
        if points >= 2:
            assert torch.allclose(ours, reference, atol=1e-6, rtol=0), end
        else:  # the reference stops short of 0: one step finishes it here
            short.append(end)
            assert float(reference[-1]) > 0 and ours.tolist() == pytest.approx(grid(T)[: end + 1].tolist() + [0.0])
    assert short == [22, 23, 24][: len(short)] and short  # the windows ending late (issue: step 21 or later)
    with pytest.raises(ValueError, match="fraction must be in"):
        compressed_tail(linear, 10, 4, 0.0)


def test_dpm2_steps_equal_diffusers_dpm_solver_plus_plus_2m():
    """Our DPM-Solver++(2M) flow step against diffusers' DPMSolverMultistepScheduler (flow sigmas, dpmsolver++,
    midpoint, order 2, first order at the last step) on a linear velocity field, step by step."""
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                        lower_order_final=True)
    sched.set_timesteps(8)
    sigmas = dpm_flow_sigmas(dict(sched.config), 8)
    assert torch.equal(sched.sigmas, sigmas)
    a = 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def velocity(x, sigma):
        return x @ a + 0.5 * torch.as_tensor(sigma).reshape(-1, 1)

    x_theirs = x_ours = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    prev = None
    for i in range(8):
        x_theirs = sched.step(velocity(x_theirs, float(sigmas[i])), sched.timesteps[i], x_theirs).prev_sample
        v = velocity(x_ours, float(sigmas[i]))
        x_next = dpm2_step(x_ours, v, sigmas[i], sigmas[i + 1], *(prev or (None, None)))
        prev = (x_ours - sigmas[i] * v, sigmas[i])
        x_ours = x_next
        assert torch.allclose(x_ours, x_theirs, atol=1e-5), i
    # in a trajectory: the steps after the last SDE step take it, with the x0 predictions before as history
    traj = sample_trajectory(velocity, torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), sigmas,
                             sde_mask=torch.zeros(8, dtype=torch.bool), ode_solver="dpm2")
    assert torch.allclose(traj.latents[:, -1], x_theirs, atol=1e-5)


# ---- DanceGRPO ----------------------------------------------------------------------------------------------------
def test_dance_grpo_trains_each_sample_on_its_own_steps_never_the_last(tiny_model, tmp_path):
    """As fastvideo/train_grpo_flux.py: n = T - 1 candidate steps (latents[:, :-1]), int(n · 0.6) per sample, drawn
    per sample; keyed by the global row, so a process holding rows 4..7 draws what one process draws for them."""
    from flowgrpo.settings import GRPOSettings
    from flowgrpo.trainer import Plan
    from tests.helpers import single

    cfg = _cfg(tiny_model, tmp_path, strategy="dance_grpo", num_steps=6, sde_steps=0, sde_kind="dance_sde",
               noise_level=0.3)
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4)
    strategy = strategy_of(cfg, policy)
    plan = make_plan(PROMPTS, 4, iteration=2)
    mask = strategy.sde_mask(plan, 6).expand(12, 6)
    steps = strategy.train_steps(mask, plan)
    assert steps.shape == (12, 3) and int(steps.max()) < 5  # int(5 x 0.6) = 3 of steps 0..4, never step 5
    assert len({tuple(r) for r in steps.tolist()}) > 1  # rows draw their own subsets
    layout = GRPOSettings(prompts_per_iter=3, group_size=4, micro_batch=0).layout(3)
    half = Plan(plan.iteration, plan.seed, plan.rows, plan.group_ids, layout.local_indices(1), layout, single())
    assert torch.equal(strategy.train_steps(mask[4:8], half), steps[4:8])
    ro = strategy.rollout(plan)
    assert torch.equal(ro.train_steps, steps) and ro.kind == "dance_sde"
    with pytest.raises(ConfigError, match="timestep_fraction must be in"):
        _cfg(tiny_model, tmp_path, strategy="dance_grpo", strategy_options={"timestep_fraction": 0.0})


def test_dance_grpo_defaults_to_its_own_step_noise_and_std_and_explicit_values_win():
    from flowgrpo.config import make_config
    from flowgrpo.core import compute_advantages

    cfg = make_config("shapes", overrides={"strategy": "dance_grpo", "judge": ""})
    assert (cfg.sde_kind, cfg.noise_level, cfg.advantage_options) == ("dance_sde", 0.3, {"unbiased": True, "eps": 1e-8})
    mine = make_config("shapes", overrides={"strategy": "dance_grpo", "judge": "", "noise_level": 0.5,
                                            "advantage_options": {"scale": "batch"}})
    assert (mine.sde_kind, mine.noise_level, mine.advantage_options) == ("dance_sde", 0.5, {"scale": "batch"})
    assert make_config("shapes", overrides={"strategy": "flow_grpo"}).sde_kind == "flow_sde"
    assert make_config("shapes", overrides={"strategy": "dance_grpo", "advantage": "rloo"}).advantage_options == {}
    # group_rewards.std() + 1e-8: rewards 1, 2, 3, 6 have mean 3 and unbiased std sqrt(14 / 3)
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    adv = compute_advantages("grpo", r, torch.zeros(4, dtype=torch.long), **cfg.advantage_options).advantages
    assert torch.allclose(adv, (r - 3) / (math.sqrt(14 / 3) + 1e-8), rtol=1e-12)


# ---- flow_grpo's KL convention ---------------------------------------------------------------------------------------
def test_flow_grpo_kl_convention_is_flow_grpos_formula(tiny_model, tmp_path):
    """scripts/train_sd3.py: kl = mean((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = sqrt(t / (1 - t)) a (no
    sqrt(dt)): per element the exact KL times the step's dt, which the update applies; one trained step here, so the
    two runs' KL metrics differ by exactly that factor."""
    from flowgrpo.core import AdvantageResult
    from flowgrpo.settings import GRPOSettings
    from flowgrpo.update import ppo_update
    from tests.helpers import single

    cfg = _cfg(tiny_model, tmp_path, strategy="flow_grpo", num_steps=5, sde_steps=1, noise_level=0.7, beta=0.1)
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, dtype=torch.float64)
    strategy = strategy_of(cfg, policy)
    ro = strategy.rollout(make_plan(PROMPTS, 4))
    policy.freeze_reference()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    batch = strategy.update_batch(ro, AdvantageResult(torch.zeros(12, dtype=torch.float64), torch.ones(12, dtype=torch.bool), {}))
    sigma, sigma_next = ro.sigmas[0], ro.sigmas[1]
    assert torch.equal(batch.step_dt, torch.full((12, 1), float(sigma - sigma_next), dtype=batch.step_dt.dtype))
    # the reference's std_dev_t by its own formula (t = 1 clamped to sigma_max = sigmas[1]) against ours / sqrt(dt)
    _, mean, std = policy.step_log_prob(ro, slice(None), 0, grad=False)
    clamped = float(sigma_next) if float(sigma) == 1 else float(sigma)  # sigma_max = sigmas[1] at t = 1
    std_dev_t = math.sqrt(float(sigma) / (1 - clamped)) * 0.7
    assert float(torch.as_tensor(std).flatten()[0]) / math.sqrt(float(sigma - sigma_next)) == pytest.approx(std_dev_t)
    with policy.reference() as ref:
        ref_mean = policy.step_log_prob(ro, slice(None), 0, transformer=ref, grad=False)[1]
    theirs = float(((mean - ref_mean) ** 2).flatten(1).mean(dim=1).mean() / (2 * std_dev_t ** 2))
    kl = {}
    for convention in ("exact", "flow_grpo"):
        settings = TrainConfig(**{**{k: getattr(cfg, k) for k in ("model", "out", "prompts_per_iter", "group_size",
                                                                    "micro_batch", "beta")}, "kl_convention": convention,
                                  "strategy": "flow_grpo", "judge": ""})
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
        kl[convention] = ppo_update(policy, optimizer, policy.trainable_module(), batch, settings, settings.layout(1),
                                    single())["kl"]
    assert kl["flow_grpo"] == pytest.approx(theirs, rel=1e-6)  # the loss weights are fp32
    assert kl["flow_grpo"] == pytest.approx(kl["exact"] * float(sigma - sigma_next), rel=1e-6)
    with pytest.raises(ConfigError, match="kl_convention flow_grpo is a convention for SDE steps"):
        _cfg(tiny_model, tmp_path, strategy="diffusion_nft", kl_convention="flow_grpo")
    with pytest.raises(ConfigError, match=r"kl_convention 'flowgrpo' is not one of \('exact', 'flow_grpo'\)"):
        _cfg(tiny_model, tmp_path, strategy="flow_grpo", kl_convention="flowgrpo")
