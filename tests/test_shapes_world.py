"""Shapes world: prompt set, renderer and the exact verifier."""
import collections
import random

import numpy as np
import pytest
import torch

from flowgrpo.prompts.shapes import all_prompts, canonical_key, load_split
from flowgrpo.rewards import build_reward
from flowgrpo.shapes import world as W
from flowgrpo.shapes.render import render, shape_mask
from flowgrpo.shapes.verify import background_noise, detect, relative_position, verify


def test_prompt_set_covers_all_tags_and_splits_are_fixed():
    prompts = all_prompts()
    assert len(prompts) == 126 and len({p["prompt"] for p in prompts}) == 126
    assert collections.Counter(p["tag"] for p in prompts) == {
        "single_object": 3, "two_object": 6, "counting": 9, "colors": 12, "position": 24, "color_attr": 72}
    test = load_split("test")
    assert len(test) == 300 and collections.Counter(e["tag"] for e in test) == {t: 50 for t in W.TAGS}
    assert test == load_split("test")  # fixed
    assert {e["prompt"] for e in test} <= {e["prompt"] for e in load_split("train")}
    with pytest.raises(ValueError, match="unknown Shapes split"):
        load_split("validation")


def test_canonical_key_equates_equivalent_prompts():
    by_prompt = {p["prompt"]: p for p in all_prompts()}
    assert canonical_key(by_prompt["a photo of a circle and a square"]) == canonical_key(by_prompt["a photo of a square and a circle"])
    assert canonical_key(by_prompt["a photo of a circle left of a square"]) == canonical_key(by_prompt["a photo of a square right of a circle"])
    assert canonical_key(by_prompt["a photo of a circle above a square"]) != canonical_key(by_prompt["a photo of a circle below a square"])


def _render_all(entries, per_entry, seed=0):
    rng = np.random.default_rng(seed)
    return [(e, render(e, rng)) for e in entries for _ in range(per_entry)]


def test_ground_truth_passes_on_the_test_split():
    rendered = _render_all(load_split("test"), 2)
    rate = np.mean([verify(img, e).passed for e, img in rendered])
    assert rate >= 0.99


def test_non_equivalent_prompts_of_the_same_tag_fail():
    prompts, rng = all_prompts(), random.Random(1)
    passed = collections.defaultdict(list)
    for e, img in _render_all(load_split("test"), 1):
        others = [o for o in prompts if o["tag"] == e["tag"] and canonical_key(o) != canonical_key(e)]
        passed[e["tag"]].append(verify(img, rng.choice(others)).passed)
    for tag, p in passed.items():
        assert np.mean(p) <= 0.05, tag


def test_noise_never_passes():
    rng = np.random.default_rng(0)
    entries = load_split("test")
    assert not any(verify(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), e).passed for e in entries)


def _canvas():
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = W.BACKGROUND
    return img


def test_verifier_hand_made_cases():
    red_circle_left = _canvas()
    red_circle_left[shape_mask("circle", 8, 16)] = W.COLORS["red"]
    red_circle_left[shape_mask("square", 24, 16)] = W.COLORS["blue"]
    dets = {d.shape: d for d in detect(red_circle_left)}
    assert set(dets) == {"circle", "square"} and dets["circle"].color == "red" and dets["square"].color == "blue"
    assert relative_position(dets["circle"], dets["square"]) == {"left of"}
    meta = {"tag": "position", "prompt": "", "include": [{"class": "square", "count": 1},
                                                       {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    v = verify(red_circle_left, meta)
    assert v.passed and v.score == 1.0
    meta["include"][1]["position"] = ["right of", 0]
    v = verify(red_circle_left, meta)
    assert not v.passed and [r.kind for r in v.requirements if not r.ok] == ["position"]
    assert v.score == pytest.approx(3 / 4)  # presence x2, position, quality


def test_malformed_blob_and_merged_shapes_fail_the_image():
    img = _canvas()
    img[6:10, 4:26] = W.COLORS["green"]  # a long bar: extreme aspect ratio
    img[20:29, 20:29] = W.COLORS["red"]
    v = verify(img, {"tag": "single_object", "prompt": "", "include": [{"class": "square", "count": 1}]})
    assert v.malformed == 1 and not v.passed
    assert [r.kind for r in v.requirements if not r.ok] == ["quality"]
    merged = _canvas()
    merged[shape_mask("square", 10, 10)] = W.COLORS["red"]
    merged[shape_mask("square", 19, 10)] = W.COLORS["red"]  # touching: one 19-px-wide component
    assert [d.shape for d in detect(merged)] == [None]


def test_form_term_ranks_how_well_objects_fit_their_shapes():
    square = {"tag": "single_object", "prompt": "a photo of a square", "include": [{"class": "square", "count": 1}]}
    clean, bar, empty, both = _canvas(), _canvas(), _canvas(), _canvas()
    clean[4:13, 4:13] = W.COLORS["red"]  # fills its box: IoU 1 with the square template
    bar[6:10, 4:26] = W.COLORS["green"]  # malformed (aspect): counts 0 whatever its IoU
    both[4:13, 4:13] = W.COLORS["red"]
    both[20:24, 4:26] = W.COLORS["green"]
    images = torch.from_numpy(np.stack([clean, bar, empty, both])).permute(0, 3, 1, 2).float() / 255
    args = (images, [square["prompt"]] * 4, [square] * 4)
    # partial score (presence, quality) + 0.5 x mean IoU with malformed objects at 0
    assert build_reward("shapes", form_weight=0.5)(*args).tolist() == pytest.approx([1.5, 0.0, 0.5, 0.5 + 0.25])
    assert build_reward("shapes")(*args).tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    assert build_reward("shapes", mode="strict", form_weight=0.5)(*args).tolist() == pytest.approx([1.5, 0, 0, 0.25])
    with pytest.raises(ValueError, match="form_weight must be in"):
        build_reward("shapes", form_weight=2.0)


def test_counting_is_exact_and_colours_are_checked():
    rng = np.random.default_rng(3)
    three = next(e for e in all_prompts() if e["prompt"] == "a photo of three circles")
    two = next(e for e in all_prompts() if e["prompt"] == "a photo of two circles")
    img = render(three, rng)
    assert verify(img, three).passed and not verify(img, two).passed  # exclude: fewer than 3
    red = next(e for e in all_prompts() if e["prompt"] == "a photo of a red square")
    assert verify(render(red, rng), red).passed


def test_background_noise_guard():
    rng = np.random.default_rng(0)
    e = load_split("test")[0]
    clean = render(e, rng)
    assert background_noise(clean) == 0.0
    grainy = np.clip(clean.astype(int) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
    assert verify(grainy, e).passed  # grain below the foreground threshold is invisible to verify ...
    assert 8 < background_noise(grainy) < 12  # ... but the guard sees it (E|U(-20,20)| max over channels ~ 10)


def test_render_rejects_impossible_entries():
    with pytest.raises(ValueError, match="at most 4"):
        render({"tag": "counting", "prompt": "five", "include": [{"class": "circle", "count": 5}]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((32, 32, 3), np.float32))


def _entry(prompt):
    return next(e for e in all_prompts() if e["prompt"] == prompt)


def _draw(*objects):
    """Red shapes at the given centres on an empty canvas."""
    img = _canvas()
    for shape, cx, cy in objects:
        img[shape_mask(shape, cx, cy)] = W.COLORS["red"]
    return img


def _reward_args(cases):
    """(images, prompts, metadata) of (image, entry, ...) cases, as a reward takes them."""
    images = torch.from_numpy(np.stack([c[0] for c in cases])).permute(0, 3, 1, 2).float() / 255
    return images, [c[1]["prompt"] for c in cases], [c[1] for c in cases]


def test_gated_score_stops_paying_for_drawing_less():
    pair, three = _entry("a photo of a circle and a square"), _entry("a photo of three circles")
    circle = _entry("a photo of a circle")
    bar = _draw(("circle", 8, 8))
    bar[22:26, 4:28] = W.COLORS["green"]  # a malformed blob beside the circle
    cases = [  # (image, entry, partial, gated): requirement counts in the comments
        (_draw(("circle", 8, 8)), pair, 2 / 3, 1 / 3),  # presence x2 + quality: the square is missing
        (bar, pair, 1 / 3, 1 / 3),  # an attempt that failed: the circle only
        (_draw(("circle", 8, 8), ("square", 22, 22)), pair, 1.0, 1.0),
        (_draw(("circle", 8, 8), ("circle", 24, 8)), three, 2 / 3, 0.0),  # count, fewer than 4, quality
        (_draw(("circle", 6, 6), ("circle", 24, 6), ("circle", 6, 24), ("circle", 24, 24)), three, 2 / 3, 2 / 3),
        (_canvas(), circle, 1 / 2, 0.0),  # empty: presence fails, "no malformed objects" holds
    ]
    args = _reward_args(cases)
    assert build_reward("shapes")(*args).tolist() == pytest.approx([c[2] for c in cases])
    assert build_reward("shapes", mode="gated")(*args).tolist() == pytest.approx([c[3] for c in cases])
    with pytest.raises(ValueError, match="mode must be one of"):
        build_reward("shapes", mode="lenient")


def test_exact_reward_stops_paying_for_spare_objects():
    pair, two = _entry("a photo of a circle and a square"), _entry("a photo of two circles")
    cases = [  # (image, entry, partial, exact partial, exact gated, exact strict, asked-exact gated)
        (_draw(("circle", 8, 8), ("square", 22, 22), ("circle", 24, 6)), pair, 1.0, 3 / 4, 3 / 4, 0.0, 2 / 4),  # a spare
        (_draw(("circle", 8, 8), ("square", 22, 22)), pair, 1.0, 1.0, 1.0, 1.0, 1.0),
        # at least 2, fewer than 3 (fails), quality; exact adds "at most 2 objects" (fails)
        (_draw(("circle", 6, 6), ("circle", 24, 6), ("circle", 6, 24)), two, 2 / 3, 2 / 4, 2 / 4, 0.0, 1 / 4),
        (_draw(("circle", 8, 8)), pair, 2 / 3, 3 / 4, 1 / 4, 0.0, 2 / 4),  # a miss: no spare, and asked-exact prices both alike
    ]
    args = _reward_args(cases)
    assert all(verify(c[0], c[1]).passed == (c[2] == 1.0) for c in cases)  # evaluation keeps GenEval's rule
    options = [{}, {"exact": True}, {"mode": "gated", "exact": True}, {"mode": "strict", "exact": True},
               {"mode": "gated", "exact": "asked"}]
    for col, kw in enumerate(options):
        assert build_reward("shapes", **kw)(*args).tolist() == pytest.approx([c[2 + col] for c in cases]), kw
    for mode in ("partial", "strict"):  # "asked" differs from true only where the gate is
        assert build_reward("shapes", mode=mode, exact="asked")(*args).tolist() == \
            build_reward("shapes", mode=mode, exact=True)(*args).tolist()
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="exact must be true, false or 'asked'"):
            build_reward("shapes", exact=bad)
