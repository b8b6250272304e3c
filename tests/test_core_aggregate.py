"""Loss weights: hand values, equality with the usual reductions, and exact gradient
invariance under gradient accumulation and per-timestep backward."""

import pytest
import torch

from flowgrpo.core import AGGREGATIONS, compute_advantages, k3_kl, loss_weights, ppo_clip_loss

MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)


def test_hand_values():
    f = torch.tensor
    expected = {
        "token-mean": MASK / 6,
        "seq-mean-token-mean": MASK * f([[1 / 6], [1 / 3], [1 / 9]], dtype=torch.float64),
        "seq-mean-token-sum": MASK / 3,
        "seq-mean-token-sum-norm": MASK / 9,
    }
    assert set(expected) == set(AGGREGATIONS)
    for mode, w in expected.items():
        torch.testing.assert_close(loss_weights(MASK, mode), w)
    torch.testing.assert_close(loss_weights(MASK, "seq-mean-token-sum-norm", max_len=4), MASK / 12)


def test_valid_zeroes_rows_and_n_seq_counts_valid_rows():
    valid = torch.tensor([True, False, True])
    m = MASK * torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(loss_weights(MASK, "token-mean", valid=valid), m / 5)
    torch.testing.assert_close(loss_weights(MASK, "seq-mean-token-sum", valid=valid), m / 2)
    sm = loss_weights(MASK, "seq-mean-token-mean", valid=valid)
    torch.testing.assert_close(sm[0], torch.tensor([0.25, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sm[2], torch.full((3,), 1 / 6, dtype=torch.float64))
    # an empty row is not a sequence
    empty_row = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.float64)])
    torch.testing.assert_close(loss_weights(empty_row, "seq-mean-token-sum")[:3], MASK / 3)
    assert torch.all(loss_weights(torch.zeros(2, 3), "token-mean") == 0)


def test_weights_reproduce_the_usual_reductions():
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(3, 3, generator=g, dtype=torch.float64)
    m = MASK
    reference = {
        "token-mean": (loss * m).sum() / m.sum(),
        "seq-mean-token-mean": ((loss * m).sum(1) / m.sum(1)).mean(),
        "seq-mean-token-sum": (loss * m).sum(1).mean(),
        "seq-mean-token-sum-norm": (loss * m).sum(1).mean() / 3,
    }
    for mode, value in reference.items():
        torch.testing.assert_close((loss_weights(m, mode) * loss).sum(), value)


def test_dtype_and_bad_input():
    assert loss_weights(MASK.bool(), "token-mean").dtype == torch.get_default_dtype()
    assert loss_weights(MASK.bool(), "token-mean", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown aggregation"):
        loss_weights(MASK, "sum")
    with pytest.raises(ValueError, match="0 or 1"):
        loss_weights(MASK * 2, "token-mean")
    with pytest.raises(ValueError, match="valid"):
        loss_weights(MASK, "token-mean", valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_len"):
        loss_weights(MASK, "seq-mean-token-sum-norm", max_len=0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        loss_weights(MASK[0], "token-mean")


# --- gradient invariance -----------------------------------------------------------------------

B, T, D, N_ACTIONS = 8, 5, 3, 4


def toy_batch():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    actions = torch.randint(N_ACTIONS, (B, T), generator=g)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    theta0 = torch.randn(D, N_ACTIONS, generator=g, dtype=torch.float64)
    # old policy a little off so some ratios leave the clip range; reference for the KL
    old = (theta0 + 0.3 * torch.randn(D, N_ACTIONS, generator=g, dtype=torch.float64))
    ref = (theta0 + 0.2 * torch.randn(D, N_ACTIONS, generator=g, dtype=torch.float64))
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    rewards[5] = float("nan")  # one unscorable sample -> invalid row
    adv = compute_advantages("grpo", rewards, torch.arange(B) // 4)
    return feats, actions, mask, theta0, old, ref, adv


def token_logp(theta, feats, actions):
    return torch.log_softmax(feats @ theta, dim=-1).gather(-1, actions[..., None]).squeeze(-1)


def elem_loss(theta, old, ref, feats, actions, adv):
    logp = token_logp(theta, feats, actions)
    with torch.no_grad():
        old_logp, ref_logp = token_logp(old, feats, actions), token_logp(ref, feats, actions)
    loss, _ = ppo_clip_loss(logp, old_logp, adv, eps_low=0.1, eps_high=0.15)
    return loss + 0.05 * k3_kl(logp, ref_logp)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_gradient_same_for_full_batch_microbatches_and_timesteps(mode):
    feats, actions, mask, theta0, old, ref, adv = toy_batch()
    w = loss_weights(mask, mode, valid=adv.valid)

    def grad(pieces):
        theta = theta0.clone().requires_grad_()
        for rows, cols in pieces:
            loss = elem_loss(theta, old, ref, feats[rows][:, cols], actions[rows][:, cols], adv.advantages[rows])
            (w[rows][:, cols] * loss).sum().backward()
        return theta.grad

    everything = slice(None)
    full = grad([(everything, everything)])
    micro = grad([(slice(i, i + 2), everything) for i in range(0, B, 2)])
    per_step = grad([(everything, slice(t, t + 1)) for t in range(T)])
    # micro-batches x timesteps, in a shuffled order
    mixed = grad([(slice(i, i + 4), slice(t, t + 1)) for t in (3, 0, 4, 1, 2) for i in (4, 0)])
    assert full.abs().max() > 1e-3  # a real signal, not all clipped away
    for other in (micro, per_step, mixed):
        torch.testing.assert_close(other, full, atol=1e-6, rtol=0)
    # and the gradient is that of the mode's usual reduction of the full batch
    theta = theta0.clone().requires_grad_()
    loss = elem_loss(theta, old, ref, feats, actions, adv.advantages)
    m = mask * adv.valid[:, None]
    rows = m.sum(1) > 0
    per_seq = (loss * m).sum(1)[rows]
    reduced = {
        "token-mean": (loss * m).sum() / m.sum(),
        "seq-mean-token-mean": (per_seq / m.sum(1)[rows]).mean(),
        "seq-mean-token-sum": per_seq.mean(),
        "seq-mean-token-sum-norm": per_seq.mean() / T,
    }[mode]
    reduced.backward()
    torch.testing.assert_close(theta.grad, full, atol=1e-12, rtol=0)


def test_naive_per_microbatch_token_mean_would_differ():
    """The invariance above is not vacuous: normalising each micro-batch by its own token count
    (the usual accumulation bug) changes the gradient on this variable-length batch."""
    feats, actions, mask, theta0, old, ref, adv = toy_batch()
    theta = theta0.clone().requires_grad_()
    for i in range(0, B, 2):
        rows = slice(i, i + 2)
        m = mask[rows] * adv.valid[rows, None]
        loss = elem_loss(theta, old, ref, feats[rows], actions[rows], adv.advantages[rows])
        ((loss * m).sum() / m.sum() / (B // 2)).backward()
    w = loss_weights(mask, "token-mean", valid=adv.valid)
    theta_ref = theta0.clone().requires_grad_()
    (w * elem_loss(theta_ref, old, ref, feats, actions, adv.advantages)).sum().backward()
    assert (theta.grad - theta_ref.grad).abs().max() > 1e-3
