"""Pref-GRPO: win rates over all pairs of a group, winrate advantages, mixing with pointwise advantages."""

import numpy as np
import pytest
import torch

from flowgrpo.config import TrainConfig
from flowgrpo.core import compute_advantages
from flowgrpo.media import to_pixels
from flowgrpo.policies.flow import Rollout
from flowgrpo.pretrain.data import images_to_tensor
from flowgrpo.prompts.shapes import all_prompts
from flowgrpo.rewards import build_judge, build_reward
from flowgrpo.settings import BatchLayout
from flowgrpo.shapes.render import render
from flowgrpo.strategies.scoring import group_winrates, pref_advantages
from flowgrpo.trainer import Plan
from tests.helpers import single


def _plan(entries: list[dict], group_ids: torch.Tensor) -> Plan:
    """One process's plan over groups of any size."""
    n = len(entries)
    return Plan(0, 0, entries, group_ids, torch.arange(n), BatchLayout(n, 1, 1, n), single())


def _rollout_of(images: torch.Tensor, entries: list[dict], group_ids: torch.Tensor) -> Rollout:
    b = len(entries)
    return Rollout([e["prompt"] for e in entries], entries, group_ids, torch.zeros(b, 2, 1), torch.zeros(b, 1),
                   torch.ones(1, dtype=torch.bool), torch.tensor([1.0, 0.0]), "flow_grpo", 0.7, images)


def test_winrates_and_advantages_match_hand_computation():
    rng = np.random.default_rng(0)
    by_prompt = {e["prompt"]: e for e in all_prompts()}
    red = by_prompt["a photo of a red circle"]
    blue = by_prompt["a photo of a blue circle"]
    two = by_prompt["a photo of two squares"]
    three = by_prompt["a photo of three squares"]
    # Group 0 asks for a red circle: two right images, one blue circle, one blank. Group 1: two squares.
    imgs = [render(red, rng), render(red, rng), render(blue, rng), render(red | {"include": []}, rng)]
    imgs += [render(two, rng), render(three, rng), render(two, rng)]
    entries = [red] * 4 + [two] * 3
    gids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    ro = _rollout_of((images_to_tensor(imgs) + 1) / 2, entries, gids)
    scores = build_reward("shapes")(ro.images, ro.prompts, ro.metadata)
    assert scores.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 1.0, 2 / 3, 1.0])  # presence, colour, quality / count, exclude
    judge = build_judge("shapes", temperature=0.1)
    plan = _plan(entries, gids)
    wins = group_winrates(judge, to_pixels(ro.images), plan)
    for rows in (range(0, 4), range(4, 7)):
        r = scores[list(rows)]
        s = torch.sigmoid((r[:, None] - r[None, :]) / 0.1)
        expected = (s.sum(1) - 0.5) / (len(r) - 1)  # diagonal sigmoid(0) = 0.5 excluded
        torch.testing.assert_close(wins[list(rows)], expected)
    cfg = TrainConfig(prompts_per_iter=1, group_size=7, micro_batch=7, optimizer_steps=1)
    adv = pref_advantages(judge, ro.images, plan, cfg)
    torch.testing.assert_close(adv.advantages,
                               compute_advantages("winrate", wins, gids, adv_clip=5.0).advantages.float())
    point = compute_advantages("grpo", scores, gids, adv_clip=5.0)
    mixed = pref_advantages(judge, ro.images, plan, cfg, point, pointwise_weight=0.25)
    torch.testing.assert_close(mixed.advantages, 0.75 * adv.advantages + 0.25 * point.advantages)
