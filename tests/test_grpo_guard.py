"""GRPO-Guard: the normalised SDE ratio against the reference formula and its identity, the sampler's kept step
means, the ratio the update computes, and the option on every SDE strategy."""
import math

import pytest
import torch

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.config import ConfigError, TrainConfig
from flowgrpo.core import normalised_log_ratio, ppo_clip_loss
from flowgrpo.policies.flow import FlowPolicy
from flowgrpo.prompts.shapes import load_split
from flowgrpo.samplers.branched import sample_branched
from flowgrpo.samplers.noise import KeyedNoise
from flowgrpo.samplers.rollout import sample_trajectory
from flowgrpo.samplers.steps import gaussian_log_prob, transition_mean_std
from flowgrpo.settings import GRPOSettings
from flowgrpo.strategies.base import AdvantageResult
from flowgrpo.update import ppo_update
from tests.helpers import flow_trainer, make_plan, single, strategy_of

PROMPTS = load_split("train")[:3]


def test_normalised_ratio_on_hand_made_log_probs_equals_the_reference_formula():
    logp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5], [-1.0]], dtype=torch.float64)
    mse = torch.tensor([[0.04], [0.01]], dtype=torch.float64)
    std = torch.tensor([[0.2], [0.5]], dtype=torch.float64)
    # by hand: 0.5 * 0.2 + 0.04 / 0.4 = 0.2 and -1.0 * 0.5 + 0.01 / 1.0 = -0.49
    assert torch.allclose(normalised_log_ratio(logp, old, mse, std), torch.tensor([[0.2], [-0.49]], dtype=torch.float64))
    # Flow-Factory's GRPOGuardTrainer.optimize, as written there (scale_factor = sqrt(-dt) * std_dev_t)
    reference = torch.exp((logp - old) * std + mse / (2 * std))
    ratio = torch.exp(normalised_log_ratio(logp, old, mse, std))
    assert torch.allclose(ratio, reference, rtol=1e-15, atol=0)
    # the first inner step: the policy is the sampler, so logp = old and the means coincide: ratio exactly 1
    assert torch.equal(torch.exp(normalised_log_ratio(old, old, torch.zeros_like(mse), std)), torch.ones_like(old))
    loss, stats = ppo_clip_loss(logp, old, torch.ones(2, dtype=torch.float64), 0.2, 0.2,
                                log_ratio=normalised_log_ratio(logp, old, mse, std))
    assert torch.allclose(loss[:, 0], -torch.minimum(ratio[:, 0], torch.tensor([1.2, 1.2], dtype=torch.float64)))
    with pytest.raises(ValueError, match="log_ratio must be shaped like logp"):
        ppo_clip_loss(logp, old, torch.ones(2), 0.2, 0.2, log_ratio=torch.zeros(2))


def test_normalised_log_ratio_is_mean_shift_times_noise_unbiased_with_a_constant_gradient():
    """x = mu_old + s eps: the plain log-ratio averages -mean(d^2) / (2 s^2) < 0 over eps; the normalised one is
    mean(d eps) (mean 0), and its gradient in mu is eps / D whatever mu."""
    g = torch.Generator().manual_seed(0)
    n, d, s = 4000, 16, 0.05
    mu_old = torch.randn(n, d, generator=g, dtype=torch.float64)
    shift = 0.02 * torch.randn(1, d, generator=g, dtype=torch.float64)
    mu = (mu_old + shift).requires_grad_(True)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = mu_old + s * eps
    logp, old = gaussian_log_prob(x, mu, s)[:, None], gaussian_log_prob(x, mu_old, s)[:, None]
    mse = (mu - mu_old).pow(2).mean(dim=1, keepdim=True)
    lr = normalised_log_ratio(logp, old, mse, torch.full_like(logp, s))
    assert torch.allclose(lr, ((mu - mu_old) * eps).mean(dim=1, keepdim=True), rtol=1e-9, atol=1e-12)
    bias = float(shift.pow(2).mean()) / (2 * s**2)
    plain = (logp - old).detach()
    assert abs(float(plain.mean()) + bias) < 4 * float(plain.std()) / math.sqrt(n)  # the negative bias is there
    assert abs(float(lr.detach().mean())) < 4 * float(lr.detach().std()) / math.sqrt(n)  # and gone
    lr.sum().backward()
    assert torch.allclose(mu.grad, eps / d, rtol=1e-9, atol=1e-12)


def _velocity(x, sigma, *rest):
    return 0.3 * x - sigma.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("noise_freqs", [0, 2])
def test_samplers_keep_the_step_mean_of_every_sde_step(noise_freqs):
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = KeyedNoise([(0, 1, 0, i) for i in range(4)])
    mask = torch.tensor([False, True, True, False, False])
    traj = sample_trajectory(_velocity, x, sigmas, sde_mask=mask, noise=noise, noise_level=0.7,
                             noise_freqs=noise_freqs, keep_means=True)
    assert traj.means.shape == (4, 5, 2, 4, 4) and not traj.means[:, ~mask].any()
    for i in (1, 2):
        v = _velocity(traj.latents[:, i], sigmas[i].expand(4))
        mean, std = transition_mean_std("flow_sde", traj.latents[:, i], v, sigmas[i], sigmas[i + 1], 0.7,
                                        sigma_max=float(sigmas[1]), noise_freqs=noise_freqs)
        assert torch.allclose(traj.means[:, i].double(), mean, atol=1e-6)
        assert torch.allclose(gaussian_log_prob(traj.latents[:, i + 1], traj.means[:, i].double(), std, noise_freqs),
                              traj.log_probs[:, i], atol=1e-4)
    assert sample_trajectory(_velocity, x, sigmas, sde_mask=mask, noise=noise).means is None
    branch = sample_branched(_velocity, _velocity, x[:2].float(), sigmas.float(), torch.tensor([1, 3]), torch.tensor([0, 0, 1, 1]),
                             noise=noise, noise_level=0.7, noise_freqs=noise_freqs, call_size=2, keep_means=True)
    for row, k in enumerate([1, 1, 3, 3]):
        assert branch.means[row, k].abs().sum() > 0 and not branch.means[row, torch.arange(5) != k].any()
    assert torch.equal(branch.means[0, 1], branch.means[1, 1])  # members of a group share their branch mean


def _cfg(model, tmp_path, **kw):
    base = dict(model=str(model), out=str(tmp_path), log_with="", prompts_per_iter=3, group_size=4, micro_batch=4,
                num_steps=5, sde_steps=3, judge="", reward="shapes", beta=0.1, grpo_guard=True)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("strategy, extra", [
    ("flow_grpo", {}), ("dance_grpo", {"sde_kind": "dance_sde", "noise_level": 0.7, "shared_noise": False}),
    ("mixgrpo", {"strategy_options": {"window_shift_every": 1}}), ("g2rpo", {"noise_freqs": 2}),
    ("dense_grpo", {"strategy_options": {"calibrate_iterations": 1}}),
])
def test_every_sde_strategy_trains_with_the_guard_at_ratio_one_on_its_first_inner_step(tmp_path, strategy, extra):
    """On the shipped model, whose groups differ in reward, so the guarded loss has a gradient."""
    trainer = flow_trainer(_cfg(SHAPES_MODEL, tmp_path, strategy=strategy, **extra))
    before = [p.detach().clone() for p in trainer.task.policy.trainable_parameters()]
    for _ in range(2):  # one optimizer step per iteration: every element's ratio is taken before it
        m = trainer.step(PROMPTS)
        assert abs(m["ratio_min"] - 1) < 1e-6 and abs(m["ratio_max"] - 1) < 1e-6
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.task.policy.trainable_parameters()))


def test_the_update_takes_the_normalised_ratio_of_each_element(tiny_model):
    """After the weights move, the update's extreme ratios are those of the formula computed here element by
    element from the trained step means, the sampler's kept ones and the step std."""
    cfg = _cfg(tiny_model, "unused", strategy="flow_grpo", clip_low=0.99, clip_high=100.0)
    policy = FlowPolicy.from_pretrained(tiny_model, micro_batch=4, dtype=torch.float64)
    strategy = strategy_of(cfg, policy)
    ro = strategy.rollout(make_plan(PROMPTS, 4))
    assert ro.means is not None
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    adv = AdvantageResult(torch.linspace(-1, 1, len(ro), dtype=torch.float64), torch.ones(len(ro), dtype=torch.bool), {})
    ratios = []
    for k in range(ro.train_steps.shape[1]):
        logp, mean, std = policy.step_log_prob(ro, slice(None), ro.train_steps[:, k], grad=False)
        mse = (mean - ro.means[torch.arange(len(ro)), ro.train_steps[:, k]]).pow(2).flatten(1).mean(dim=1)
        s = torch.as_tensor(std).expand_as(mean).flatten(1)[:, 0]
        ratios.append(torch.exp((logp - ro.log_probs[torch.arange(len(ro)), ro.train_steps[:, k]]) * s + mse / (2 * s)))
    ratios = torch.cat(ratios)
    batch = strategy.update_batch(ro, adv)
    assert batch.ratio_norm
    settings = GRPOSettings(prompts_per_iter=3, group_size=4, micro_batch=4, clip_low=0.99, clip_high=100.0)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    m = ppo_update(policy, optimizer, policy.trainable_module(), batch, settings, settings.layout(1), single())
    assert float(ratios.min()) < 0.999 and float(ratios.max()) > 1.001  # the weights moved enough to tell
    assert m["ratio_min"] == pytest.approx(float(ratios.min()), rel=1e-9)
    assert m["ratio_max"] == pytest.approx(float(ratios.max()), rel=1e-9)


@pytest.mark.parametrize("strategy", ["diffusion_nft", "awm"])
def test_forward_process_strategies_refuse_the_guard(strategy, tmp_path):
    with pytest.raises(ConfigError, match="grpo_guard normalises the ratios of SDE steps"):
        TrainConfig(out=str(tmp_path), strategy=strategy, grpo_guard=True)
