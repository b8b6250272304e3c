"""The iterative unmasking sampler and the schedule policy's maths, on hand-built cases: the unmasking order, the
log-probs of committed tokens and of schedule actions against torch.distributions, keyed noise."""
import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from flowgrpo.policies.schedule import SchedulePolicy
from flowgrpo.samplers.unmasking import (CFG, RATIO, REMASK, TEMPERATURE, commit_count, committed_log_prob,
                                         cosine_ratios, default_schedule, guided_logits, gumbel, keyed_gumbels,
                                         sample_unmasking, tokens_at)

M = 3  # mask id of the hand-built cases (vocabulary 0, 1, 2)
# Per position, its most likely token and that token's probability (temperature 1):
# 0 -> token 1 (e^3 / (e^3 + 2) = 0.909), 1 -> token 0 (0.787), 2 -> token 2 (0.987), 3 -> token 1 (0.582)
LOGITS = torch.tensor([[[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.5, 0.0]]])


def _run(schedule: torch.Tensor, remask_noise: torch.Tensor | None = None):
    states = []

    def logits_fn(tokens, t):
        states.append(tokens.clone())
        return LOGITS

    def noise_fn(t):  # no sampling noise: every candidate is its position's most likely token
        return torch.zeros(1, 4, 3), torch.zeros(1, 4) if remask_noise is None else remask_noise[t][None]

    traj = sample_unmasking(logits_fn, torch.full((1, 4), M), M, schedule[None], noise_fn)
    return traj, torch.cat(states)


def test_a_deterministic_schedule_unmasks_in_the_hand_computed_order():
    schedule = default_schedule(3, guidance=1.0, remask=0.0)
    schedule[:, RATIO] = torch.tensor([0.25, 2 / 3, 1.0])  # 1 of 4 positions, 2 of the 3 left, the last one
    traj, states = _run(schedule)
    # confidences 0.987 > 0.909 > 0.787 > 0.582: position 2 first, then 0 and 1, then 3
    assert traj.commit_step.tolist() == [[1, 1, 0, 2]]
    assert traj.tokens.tolist() == [[1, 0, 2, 1]]
    assert traj.counts.tolist() == [[1, 2, 1]]
    assert states.tolist() == [[M, M, M, M], [M, M, 2, M], [1, 0, 2, M]]
    for t in range(3):  # the state before each step, as training rebuilds it
        assert torch.equal(tokens_at(traj.tokens, traj.commit_step, t, M), states[t : t + 1])
    # remasking randomness: gumbel noise 10 on position 3 at step 0 (temperature 1) puts it first
    noise = torch.zeros(3, 4)
    noise[0, 3] = 10.0
    schedule[:, REMASK] = 1.0
    traj, _ = _run(schedule, noise)
    assert traj.commit_step.tolist() == [[1, 2, 1, 0]]  # then 2 and 0 (0.987, 0.909), then 1


def test_commit_counts_round_keep_one_per_step_and_finish_on_the_last():
    n = torch.tensor([10, 10, 3, 0])
    assert commit_count(n, torch.tensor([0.26, 0.01, 0.99, 0.5]), last=False).tolist() == [3, 1, 3, 0]
    assert commit_count(n, torch.tensor([0.0, 0.0, 0.0, 0.0]), last=True).tolist() == [10, 10, 3, 0]
    # cosine ratios leave cos(pi/2 (t+1)/T) of the positions masked after step t (aMUSEd's schedule)
    r = cosine_ratios(6).double()
    left = torch.cumprod(1 - r, 0)
    assert left[:-1] == pytest.approx(torch.cos(math.pi / 2 * torch.arange(1, 6) / 6), abs=1e-6)
    assert r[-1] == 1.0 and float(left[-1]) == 0.0


def test_committed_token_log_probs_equal_categorical_log_probs():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    scale, temperature = torch.tensor([1.0, 3.0, 0.5]), torch.tensor([1.0, 0.7, 1.6])
    tokens = torch.randint(4, (3, 5), generator=g)
    committed = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logits = guided_logits(cond, uncond, scale)
    got = committed_log_prob(logits, tokens, committed, temperature)
    for b in range(3):
        guided = uncond[b] + scale[b] * (cond[b] - uncond[b])
        lp = Categorical(logits=guided / temperature[b]).log_prob(tokens[b])
        assert float(got[b]) == pytest.approx(float(lp[committed[b]].mean()), abs=1e-6)


def test_gumbel_max_samples_the_tempered_categorical():
    logits, temperature = torch.tensor([0.5, 2.0, -1.0, 1.0]), 0.8
    u = torch.rand(40000, 4, generator=torch.Generator().manual_seed(1))
    picks = (logits / temperature + gumbel(u)).argmax(dim=1)
    freq = torch.bincount(picks, minlength=4).double() / len(picks)
    assert freq == pytest.approx(Categorical(logits=logits / temperature).probs.double(), abs=0.01)


def test_keyed_gumbels_depend_on_the_row_key_and_step_only():
    keys = [(0, 5, 3, 17), (0, 5, 3, 18)]
    both = keyed_gumbels(keys, 2, 6, 4)
    alone = keyed_gumbels(keys[1:], 2, 6, 4)
    assert torch.equal(both[0][1], alone[0][0]) and torch.equal(both[1][1], alone[1][0])
    assert not torch.equal(both[0][0], both[0][1])
    assert not torch.equal(keyed_gumbels(keys, 3, 6, 4)[0], both[0])
    assert both[0].shape == (2, 6, 4) and both[1].shape == (2, 6)


def test_schedule_policy_starts_at_the_default_and_its_log_probs_are_gaussian():
    policy = SchedulePolicy.default(5, guidance=4.0, init_std=0.4)
    default = default_schedule(5, 4.0)
    active = policy.active()
    assert active.sum() == 5 * 4 - 2 and not active[-1, RATIO] and not active[-1, REMASK]
    assert policy.mean_schedule()[active] == pytest.approx(default[active], abs=1e-5)
    assert float(policy.mean_schedule()[2, CFG]) == pytest.approx(4.0) and policy._high[CFG] == 8.0
    eps = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    u = policy.sample(eps)
    values = policy.squash(u)
    assert bool(((values > policy._low) & (values < policy._high)).all())
    with torch.no_grad():
        policy.mean.add_(0.3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(3)))
        policy.log_std.add_(0.2)
    with torch.no_grad():
        expected = Normal(policy.mean, policy.log_std.exp()).log_prob(u)
        got = policy.log_prob(u)
        torch.testing.assert_close(got, (expected * active).sum(-1), atol=1e-5, rtol=0)
        assert torch.equal(policy.log_prob(u[:, 1:3], slice(1, 3)), got[:, 1:3])  # a step's log-prob alone
        ref_mean, ref_log_std = torch.zeros(5, 4), torch.full((5, 4), -0.5)
        kl = kl_divergence(Normal(policy.mean, policy.log_std.exp()), Normal(ref_mean, ref_log_std.exp()))
        torch.testing.assert_close(policy.kl(ref_mean, ref_log_std), (kl * active).sum(-1), atol=1e-5, rtol=0)


def test_schedule_values_reach_the_sampler_per_row():
    """Two rows with different ratios and temperatures commit and score as their own schedules say."""
    schedule = default_schedule(2, guidance=1.0, remask=0.0).expand(2, -1, -1).clone()
    schedule[0, 0, RATIO], schedule[1, 0, RATIO] = 0.25, 0.75
    schedule[1, :, TEMPERATURE] = 0.5
    traj = sample_unmasking(lambda x, t: LOGITS.expand(2, -1, -1), torch.full((2, 4), M), M, schedule,
                            lambda t: (torch.zeros(2, 4, 3), torch.zeros(2, 4)))
    assert traj.counts.tolist() == [[1, 3], [3, 1]]
    first = traj.commit_step == 0
    expected = committed_log_prob(LOGITS.expand(2, -1, -1), traj.tokens, first, torch.tensor([1.0, 0.5]))
    assert torch.equal(traj.log_probs[:, 0], expected)
