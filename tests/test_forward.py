"""Forward-process strategies (DiffusionNFT, AWM): their losses against hand-computed values and their defining
limits, the levels and noise each sample trains at, and training through the one update with Euler and DPM-Solver++
rollouts, resumed exactly."""
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.config import ConfigError, TrainConfig, make_config
from flowgrpo.core import AdvantageResult
from flowgrpo.policies.ema import ramp_decay
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.strategies.awm import matching_log_prob
from flowgrpo.strategies.diffusion_nft import nft_loss, optimality
from flowgrpo.strategies.forward import stratified_levels, time_fraction_levels
from flowgrpo.samplers.noise import keyed_rng
from flowgrpo.update import ppo_update
from tests.helpers import flow_trainer, make_plan, single, strategy_of

PROMPTS = load_split("train")[:3]


def _cfg(model, tmp_path, strategy, options=None, **kw):
    base = dict(model=str(model), out=str(tmp_path), log_with="", prompts_per_iter=3, group_size=4, micro_batch=4,
                num_steps=6, judge="", reward="shapes", beta=0.0, strategy=strategy, strategy_options=options or {})
    return TrainConfig(**(base | kw))


# ---- DiffusionNFT's loss -------------------------------------------------------------------------------------------
def test_nft_loss_equals_the_formula_computed_by_hand():
    x0, eps, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([0.5])
    x_t = (1 - t) * x0 + t * eps  # [0.75, -0.5]
    v, v_old = torch.tensor([[0.2, -0.4]]), torch.tensor([[0.1, 0.3]])
    r = optimality(torch.tensor([2.5]), 5.0)
    assert float(r) == 0.75
    # beta 0.5: v+ = [0.15, -0.05], x0+ = x_t - 0.5 v+ = [0.675, -0.475], errors [-0.325, 1.525], weight 0.925;
    # v- = 1.5 v_old - 0.5 v = [0.05, 0.65], x0- = [0.725, -0.825], errors [-0.275, 1.175], weight 0.725
    positive = (0.325 ** 2 + 1.525 ** 2) / 2 / 0.925
    negative = (0.275 ** 2 + 1.175 ** 2) / 2 / 0.725
    expected = (0.75 * positive + 0.25 * negative) / 0.5 * 5.0
    got = nft_loss(v, v_old, x_t, x0, t, r, beta=0.5, adv_clip_max=5.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert optimality(torch.tensor([-9.0, 0.0, 9.0]), 5.0).tolist() == [0.0, 0.5, 1.0]


def _grad(fn, v):
    v = v.clone().requires_grad_(True)
    fn(v).sum().backward()
    return v.grad


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_vanishes_at_r_half_and_is_the_positive_terms_alone_at_r_one(beta):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    v_old = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    half, one = torch.full((3,), 0.5), torch.ones(3)
    at_old = _grad(lambda v: nft_loss(v, v_old, x_t, x0, t, half, beta, 5.0), v_old)
    assert float(at_old.abs().max()) < 1e-12  # the two implicit policies pull equally and oppositely
    v = v_old + 0.3 * torch.randn(3, 4, 5, generator=g, dtype=torch.float64)

    def positive_alone(w):  # ‖x_t - t (β w + (1 - β) v_old) - x0‖² / (its detached mean |error|), · c / β
        err = x_t - t.view(-1, 1, 1) * (beta * w + (1 - beta) * v_old) - x0
        return (err ** 2 / err.detach().abs().mean(dim=(1, 2), keepdim=True)).mean(dim=(1, 2)) * 5.0 / beta

    assert torch.allclose(_grad(lambda w: nft_loss(w, v_old, x_t, x0, t, one, beta, 5.0), v),
                          _grad(positive_alone, v), rtol=1e-12, atol=1e-14)


# ---- AWM's log-likelihood ------------------------------------------------------------------------------------------
def test_matching_log_prob_weightings_hand_computed():
    v, target, t = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0.5])
    mse = (1 + 4) / 2
    assert float(matching_log_prob(v, target, t, "uniform")) == -mse
    assert float(matching_log_prob(v, target, t, "t")) == -mse * 0.5
    assert float(matching_log_prob(v, target, t, "t2")) == -mse * 0.25
    assert float(matching_log_prob(v, target, t, "ghuber", 0.25)) == pytest.approx(
        -((mse + 1e-10) ** 0.25 - 1e-10 ** 0.25) * 0.5 / 0.25, rel=1e-12)


def test_awm_with_every_advantage_one_is_the_plain_flow_matching_loss(tiny_model, tmp_path):
    """One update of AWM (uniform weighting, no KL, no proximal term) under SGD moves the weights by exactly the
    gradient of the mean flow-matching loss ‖v(x_t) - (ε - x0)‖² over the samples and their levels."""
    cfg = _cfg(tiny_model, tmp_path, "awm", {"weighting": "uniform", "ema_kl": 0.0, "train_levels": 2},
               optim="sgd", lr=1.0, grad_clip=1e9, micro_batch=0)
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=12)
    strategy = strategy_of(cfg, policy)
    plan = make_plan(PROMPTS, 4)
    ro = strategy.rollout(plan)
    assert ro.times.shape == (12, 2)
    params = policy.trainable_parameters()
    before = [p.detach().clone() for p in params]
    flow_matching = 0.0
    for col in range(2):
        rows = torch.arange(12)
        x_t, t, eps = ro.noised(rows, col)
        v = policy.velocity(x_t, t, policy.cond(ro.prompts), ro.guidance, grad=True)
        flow_matching = flow_matching + ((v - (eps - ro.x0)) ** 2).mean(dim=(1, 2, 3)).sum() / 24
    grads = torch.autograd.grad(flow_matching, params)
    adv = AdvantageResult(torch.ones(12), torch.ones(12, dtype=torch.bool), {})
    optimizer = torch.optim.SGD(params, lr=1.0)
    ppo_update(policy, optimizer, policy.trainable_module(), strategy.update_batch(ro, adv), cfg, cfg.layout(1),
               single())
    scale = max(float(g.abs().max()) for g in grads)
    assert scale > 0
    for p, p0, g in zip(params, before, grads):  # the velocities are float32: their rounding, nothing more
        assert torch.allclose(p.detach() - p0, -g, rtol=1e-5, atol=1e-6 * scale)


# ---- levels and their draws ---------------------------------------------------------------------------------------
def test_levels_are_the_references_draws():
    rng = keyed_rng(0, 1)
    nft = time_fraction_levels(rng, 10, 0.99)
    assert len(nft) == 9 and len(set(nft)) == 9 and set(nft) <= set(range(10))
    sigmas = torch.linspace(1, 0, 15)  # 14 steps: sigma >= 0.1 at steps 0..12; strata over steps 1..12
    for seed in range(20):
        picks = stratified_levels(keyed_rng(seed), sigmas, 6, 0.9)
        bounds = torch.linspace(1, 12, 7).long().tolist()  # [1, 2, 4, 6, 8, 10, 12]
        assert all(lo <= p < max(hi, lo + 1) for p, lo, hi in zip(picks, bounds, bounds[1:]))


def test_lagged_copy_schedules_are_the_references():
    nft = ramp_decay(0, 0.001, 0.5)  # DiffusionNFT decay_type 1, after optimizer step n
    assert [nft(n) for n in (1, 10, 499, 500, 2000)] == pytest.approx([0.001, 0.01, 0.499, 0.5, 0.5])
    slow = ramp_decay(75, 0.0075, 0.999)  # decay_type 2
    assert [slow(n) for n in (74, 75, 76, 300)] == pytest.approx([0.0, 0.0, 0.0075, 0.999])


def test_forward_options_are_checked():
    with pytest.raises(ConfigError, match="diffusion_nft.beta"):
        TrainConfig(strategy="diffusion_nft", judge="", strategy_options={"beta": 0.0})
    with pytest.raises(ConfigError, match="awm.weighting"):
        TrainConfig(strategy="awm", judge="", strategy_options={"weighting": "cubic"})
    with pytest.raises(ConfigError, match="ode_solver"):
        TrainConfig(strategy="awm", judge="", strategy_options={"ode_solver": "heun"})


# ---- training through the trainer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,solver", [("diffusion_nft", "dpm2"), ("diffusion_nft", "euler"),
                                             ("awm", "euler"), ("awm", "dpm2")])
def test_forward_strategies_train_and_resume_exactly(tmp_path, strategy, solver):
    """On the shipped Shapes model (its rewards spread within a group), three iterations, uninterrupted and
    interrupted after the first (a new trainer resumes from its checkpoint), end with the same weights and the same
    lagged copy; the group's members sample from their own noise; the reference KL is trained and reported."""
    options = {"ode_solver": solver} | ({"train_levels": 2} if strategy == "awm" else {"time_fraction": 0.5})
    small = dict(save_every=1, beta=0.01, lr=1e-3, num_steps=4, micro_batch=12)
    cfg = _cfg(SHAPES_MODEL, tmp_path / "whole", strategy, options, **small)
    whole = flow_trainer(cfg)
    first = whole.task.rollout(whole.plan(PROMPTS))
    assert not torch.equal(first.x0[0], first.x0[1])  # group members differ
    metrics = [whole.step(PROMPTS) for _ in range(3)]
    assert all(m["grad_norm"] > 0 and m["kl"] >= 0 for m in metrics) and metrics[-1]["kl"] > 0
    whole.save()

    cut = _cfg(SHAPES_MODEL, tmp_path / "cut", strategy, options, **small)
    a = flow_trainer(cut)
    a.step(PROMPTS)
    a.save()
    b = flow_trainer(cut)
    b.resume()
    assert b.state.iteration == 1 and b.task.lag_updates == 1
    for _ in range(2):
        b.step(PROMPTS)
    b.save()
    for name in ("weights.safetensors", "strategy.safetensors"):
        w = load_file(tmp_path / "whole" / "checkpoints" / "iter-000003" / name)
        r = load_file(tmp_path / "cut" / "checkpoints" / "iter-000003" / name)
        assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w), name
    live = whole.task.policy.trainable_state_dict()
    lagged = load_file(tmp_path / "whole" / "checkpoints" / "iter-000003" / "strategy.safetensors")
    assert lagged.keys() == {f"lagged.{k}" for k in live}
    assert any(not torch.equal(lagged[f"lagged.{k}"], live[k]) for k in live)  # it lags...
    assert all(torch.allclose(lagged[f"lagged.{k}"], live[k], atol=1e-4) for k in live)  # ...by little, so early


def test_the_sd35_presets_are_the_references_recipes():
    """Spot values of each recipe (the preset's comments name the reference file of every value)."""
    nft = make_config("sd35-medium-nft", overrides={"model": "m"})
    assert (nft.strategy, nft.num_steps, nft.guidance, nft.group_size, nft.prompts_per_iter) == \
        ("diffusion_nft", 10, 1.0, 24, 48)
    assert (nft.lora_rank, nft.lora_alpha, nft.beta, nft.ema_decay) == (32, 64, 1e-4, 0.9)
    o = nft.strategy_options
    assert (o.beta, o.adv_clip_max, o.time_fraction, o.ode_solver, o.lag_cap) == (1.0, 5.0, 0.99, "dpm2", 0.5)
    awm = make_config("sd35-medium-awm", overrides={"model": "m", "awm.ema_warmup": "500"})
    assert (awm.strategy, awm.num_steps, awm.group_size, awm.adv_clip, awm.advantage_options) == \
        ("awm", 14, 16, 1.0, {"scale": "batch"})
    o = awm.strategy_options
    assert (o.weighting, o.train_levels, o.time_range, o.ema_cap, o.ema_warmup) == ("ghuber", 6, 0.9, 0.3, 500)
    with pytest.raises(ConfigError, match="lora_alpha"):
        TrainConfig(strategy="awm", judge="", lora_alpha=8.0)


def test_a_checkpoint_without_the_lagged_copy_is_refused_clearly(tiny_model, tmp_path):
    """A forward strategy resumes only with its lagged copy; an SDE strategy refuses tensors it does not keep."""
    trainer = flow_trainer(_cfg(tiny_model, tmp_path, "diffusion_nft", {"time_fraction": 0.5}))
    with pytest.raises(ValueError, match=r"ckpt: its strategy tensors are not diffusion_nft's lagged copy .* "
                                         r"missing"):
        trainer.task.load_tensors({}, "ckpt")
    with pytest.raises(ValueError, match="unexpected"):
        trainer.task.load_tensors({**trainer.task.tensors(), "lagged.extra": torch.zeros(1)}, "ckpt")
    trainer.task.load_tensors(trainer.task.tensors(), "ckpt")  # its own copy loads
    sde = flow_trainer(_cfg(tiny_model, tmp_path / "sde", "flow_grpo"))
    with pytest.raises(ValueError, match="strategy flow_grpo does not keep"):
        sde.task.load_tensors(trainer.task.tensors(), "ckpt")
