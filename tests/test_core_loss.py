"""PPO-clip loss and the KL terms against hand values and torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from flowgrpo.core import gaussian_mean_kl, k3_kl, ppo_clip_loss


def test_ratio_one_at_old_logp_gives_minus_advantage():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    loss, stats = ppo_clip_loss(logp, logp.clone(), adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, -adv[:, None].expand(3, 4), atol=0, rtol=0)
    assert stats["ratio_mean"] == 1 and stats["ratio_min"] == 1 and stats["ratio_max"] == 1
    assert stats["clip_frac"] == 0


def test_asymmetric_clip_hand_cases_and_gradients():
    # (A, r): clipped above for A > 0, clipped below for A < 0, inside the range
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]], dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    loss, stats = ppo_clip_loss(logp, torch.zeros_like(ratio), adv, eps_low=0.2, eps_high=0.28)
    # max(-A r, -A clip(r, .8, 1.28)): -1.28 (clip), -0.5, 1.5, 0.8 (clip), -2.2
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.28, -0.5, 1.5, 0.8, -2.2]], dtype=torch.float64))
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_min"] == 0.5 and stats["ratio_max"] == 1.5 and stats["ratio_mean"] == pytest.approx(5.1 / 5)
    loss.sum().backward()
    # d(-A r)/d logp = -A r where unclipped; 0 where the clipped branch wins
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0, -2.2]], dtype=torch.float64))


def test_per_token_advantages_and_masked_stats():
    logp = torch.log(torch.tensor([[2.0, 1.0], [1.0, 0.25]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0], [2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 1]])
    loss, stats = ppo_clip_loss(logp, torch.zeros_like(logp), adv, 0.2, 0.2, mask=mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.0], [-2.0, -0.25]], dtype=torch.float64))
    # masked: ratios 2, 1, .25 -> clipped where r=2 (A>0) only; r=.25 with A>0 keeps -A r
    assert stats["ratio_max"] == 2.0 and stats["ratio_min"] == 0.25
    assert stats["ratio_mean"] == pytest.approx(3.25 / 3) and stats["clip_frac"] == pytest.approx(1 / 3)
    _, empty = ppo_clip_loss(logp, logp, adv, 0.2, 0.2, mask=torch.zeros(2, 2))
    assert math.isnan(empty["ratio_mean"])


def test_ppo_clip_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ppo_clip_loss(x, torch.zeros(2, 4), torch.zeros(2), 0.2, 0.2)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(x, x, torch.zeros(3), 0.2, 0.2)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_loss(x, x, torch.zeros(2), 1.0, 0.2)


def test_gaussian_mean_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ref = mean + 0.1 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 0.2, 1.3], dtype=torch.float64)  # per-sample sigma_t * sqrt(-dt)
    kl = gaussian_mean_kl(mean, ref, std)
    s = std.view(3, 1, 1, 1).expand_as(mean)
    expected = kl_divergence(Normal(mean, s), Normal(ref, s)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected)
    assert kl.shape == (3,)
    # scalar std and a hand case: mean over 2 elements of d^2 / (2 * 0.25)
    torch.testing.assert_close(
        gaussian_mean_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 0.5), torch.tensor([1.0])
    )
    assert torch.all(gaussian_mean_kl(mean, mean, std) == 0)
    with pytest.raises(ValueError, match="shape"):
        gaussian_mean_kl(mean, ref[:2], std)


def test_k3_hand_value_nonnegative_and_unbiased():
    val = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    # exp(log .5) - log .5 - 1
    torch.testing.assert_close(val, torch.tensor([0.5 - math.log(0.5) - 1]))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert torch.all(k3_kl(a, b) >= 0) and torch.all(k3_kl(a, a) == 0)
    # E_{x~p}[k3(x)] = KL(p || q) exactly for categorical distributions
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    expectation = (p * k3_kl(p.log(), q.log())).sum()
    torch.testing.assert_close(expectation, kl_divergence(Categorical(probs=p), Categorical(probs=q)))
