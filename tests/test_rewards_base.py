"""Reward contracts, registry, combinations and pairwise helpers on small hand-checked rewards."""
import math

import pytest
import torch

from flowgrpo.rewards import (
    JUDGES,
    REWARDS,
    MultiReward,
    PairwiseJudge,
    PointwiseAsPairwise,
    Reward,
    WeightedSum,
    bradley_terry,
    build_judge,
    build_reward,
    preference_matrix,
    register_reward,
)
from flowgrpo.rewards.base import UnknownNameError


class Brightness(Reward):
    """Mean pixel value; NaN when metadata says so (to exercise NaN handling)."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        out = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor([m.get("unscorable", False) for m in metadata]), torch.nan, out)


class Redness(Reward):
    name = "redness"

    def score(self, images, prompts, metadata):
        return images[:, 0].mean(dim=(1, 2))


def flat(values):
    """One 2x2 image per value, every pixel equal to that value."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2).clone()


@pytest.fixture
def clean_registry():
    """Remove the test rewards this test registers, even when it fails."""
    before = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(before)


def test_contract_validates_inputs_with_clear_errors():
    r = Brightness()
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        r(torch.zeros(2, 4, 2, 2), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        r(torch.full((1, 3, 2, 2), -1.0), ["a"])
    with pytest.raises(TypeError, match="float"):
        r(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), ["a"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        r(flat([0.1, 0.2]), ["a"])
    with pytest.raises(ValueError, match="a single string"):
        r(flat([0.1]), "a")
    with pytest.raises(ValueError, match="one metadata dict per image"):
        r(flat([0.1, 0.2]), ["a", "b"], [{}])


def test_reward_output_and_nan_counting():
    r = Brightness()
    out = r(flat([0.25, 0.5, 0.75]), ["a"] * 3, [{}, {"unscorable": True}, {}])
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out[0].item() == 0.25 and math.isnan(out[1].item()) and out[2].item() == 0.75
    assert r.stats["samples"] == 3 and r.stats["nan"] == 1


def test_registry_errors_name_known_rewards_and_options():
    with pytest.raises(UnknownNameError) as err:
        build_reward("no-such-reward")
    assert f"known rewards: {', '.join(sorted(REWARDS))}" in str(err.value)
    assert {"aesthetic", "clipscore", "ocr", "pickscore", "remote", "vlm", "weighted"} <= set(REWARDS)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['colour'\].*accepted options: url, token"):
        build_reward("remote", url="http://127.0.0.1:1", colour="red")
    with pytest.raises(TypeError, match=r"reward 'clipscore' needs option\(s\) \['checkpoint'\]"):
        build_reward("clipscore", arch="ViT-B-32")
    with pytest.raises(UnknownNameError) as err:
        build_judge("nope")
    assert f"known judges: {', '.join(sorted(JUDGES))}" in str(err.value) and {"pointwise", "vlm_pairwise"} <= set(JUDGES)


def test_register_reward_and_weighted_sum_from_config(clean_registry):
    register_reward("test_brightness", Brightness, overwrite=True)
    register_reward("test_redness", Redness, overwrite=True)
    with pytest.raises(KeyError, match="already registered"):
        register_reward("test_brightness", Brightness)
    ws = build_reward("weighted", components=[
        {"name": "test_brightness", "weight": 2.0},
        {"name": "test_redness", "weight": -0.5, "label": "red"},
    ])
    assert ws.name == "weighted(2*brightness+-0.5*red)"
    images = flat([0.2, 0.6])
    images[1, 0] = 1.0  # second image: red channel 1, others 0.6 -> brightness (1 + 0.6 + 0.6) / 3
    out = ws(images, ["p", "q"], [{}, {}])
    expected = [2 * 0.2 - 0.5 * 0.2, 2 * (2.2 / 3) - 0.5 * 1.0]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wieght'\]"):
        build_reward("weighted", components=[{"name": "test_redness", "wieght": 1}])


def test_weighted_sum_propagates_nan_even_with_zero_weight():
    ws = WeightedSum([Brightness(), Redness()], [0.0, 1.0])
    out = ws(flat([0.3, 0.4]), ["a", "b"], [{"unscorable": True}, {}])
    assert math.isnan(out[0].item()) and out[1].item() == pytest.approx(0.4)
    assert ws.stats["nan"] == 1


def test_multi_reward_stacks_columns_for_gdpo():
    multi = MultiReward([Brightness(), Redness()], weights=[1.0, 0.5])
    images = flat([0.1, 0.9])
    images[0, 0] = 0.4
    out = multi(images, ["a", "b"], [{}, {"unscorable": True}])
    assert multi.names == ["brightness", "redness"] and multi.weights == [1.0, 0.5]
    assert out.shape == (2, 2)
    assert out[0].tolist() == pytest.approx([0.2, 0.4])
    assert math.isnan(out[1, 0].item()) and out[1, 1].item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="labels must be unique"):
        MultiReward([Brightness(), Brightness()])


def test_bradley_terry_values_and_nan_pairs():
    p = bradley_terry(torch.tensor([1.0, 0.0, 2.0, math.nan]), torch.tensor([0.0, 0.0, 1.0, 1.0]), 0.5)
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(-2)), 0.5])


def test_pointwise_as_pairwise_prefer_and_matrix():
    judge = PointwiseAsPairwise(Brightness(), temperature=0.1)
    a, b = flat([0.8, 0.5, 0.2]), flat([0.6, 0.5, 0.3])
    p = judge.prefer("a cat", a, b, metadata={})
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(1))])
    group = flat([0.1, 0.4, 0.7])
    s = preference_matrix(judge, "a cat", group)
    r = torch.tensor([0.1, 0.4, 0.7])
    expected = torch.sigmoid((r[:, None] - r[None, :]) / 0.1).fill_diagonal_(0.5)
    assert torch.allclose(s, expected, atol=1e-6)
    assert torch.allclose(s + s.T, torch.ones(3, 3))
    # metadata reaches the reward: an unscorable prompt gives no preference, counted
    p = judge.prefer("x", a, b, metadata={"unscorable": True})
    assert p.tolist() == [0.5, 0.5, 0.5] and judge.stats["nan_pairs"] == 3
    with pytest.raises(ValueError, match="temperature"):
        PointwiseAsPairwise(Brightness(), temperature=0)


class FirstChannelJudge(PairwiseJudge):
    """Prefers the image with the larger red mean, deterministically (no matrix shortcut)."""

    name = "red_judge"

    def compare(self, prompt, images_a, images_b, metadata):
        return (images_a[:, 0].mean(dim=(1, 2)) > images_b[:, 0].mean(dim=(1, 2))).float()


def test_preference_matrix_from_pairs_is_antisymmetric():
    judge = FirstChannelJudge()
    group = flat([0.3, 0.9, 0.1, 0.5])
    s = preference_matrix(judge, "p", group)
    order = torch.tensor([0.3, 0.9, 0.1, 0.5])
    expected = (order[:, None] > order[None, :]).float().fill_diagonal_(0.5)
    assert torch.equal(s, expected)
    assert judge.stats["pairs"] == 6  # G(G-1)/2 asked once each
    with pytest.raises(ValueError, match="at least 2"):
        preference_matrix(judge, "p", group[:1])
    with pytest.raises(ValueError, match="must pair up"):
        judge.prefer("p", group[:2], group[:3])


def test_pointwise_judge_from_config(clean_registry):
    register_reward("test_brightness", Brightness, overwrite=True)
    judge = build_judge("pointwise", reward="test_brightness", temperature=2.0)
    assert judge.name == "bt(brightness)"
    p = judge.prefer("p", flat([1.0]), flat([0.0]))
    assert p.item() == pytest.approx(1 / (1 + math.exp(-0.5)))
