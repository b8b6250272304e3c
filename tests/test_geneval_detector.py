"""GenEval's protocol without mmdet: the rules on hand-built detections (hand-computed verdicts for every tag)
and the real metadata."""
import json
from pathlib import Path

import numpy as np
import pytest

from flowgrpo.eval.geneval_rules import (
    COCO_CLASSES,
    COLORS,
    asked_colours,
    box_iou,
    check_geneval_metadata,
    colour_from_logits,
    judge,
    keep_detections,
    unscorable_reason,
)
from flowgrpo.prompts.loaders import load_geneval
from flowgrpo.shapes.verify import Detection

FIXTURE = Path(__file__).parent / "fixtures" / "geneval_metadata_subset.jsonl"


def det(cls, conf, box=(0, 0, 40, 40), color=None):
    return Detection(cls, color, box, (box[2] - box[0]) * (box[3] - box[1]), conf)


def verdict(dets, entry):
    """GenEval's verdict on raw detections: filter as GenEval does, then judge."""
    return judge([dets[i] for i in keep_detections(dets, entry["tag"])], entry)


def entry(tag, *include, exclude=None):
    e = {"tag": tag, "include": list(include), "prompt": "p"}
    return e | ({"exclude": exclude} if exclude else {})


def summary(v):
    return v.passed, [(r.kind, r.ok) for r in v.requirements]


# ---------------------------------------------------------------- the rules on hand-built detections

def test_single_and_two_object_need_each_class_above_the_0_3_threshold():
    dog = entry("single_object", {"class": "dog", "count": 1})
    assert summary(verdict([det("dog", 0.31)], dog)) == (True, [("presence", True)])
    assert summary(verdict([det("dog", 0.3), det("cat", 0.99)], dog)) == (False, [("presence", False)])  # > 0.3 only
    two = entry("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1})
    v = verdict([det("dog", 0.9), det("dog", 0.8), det("cat", 0.2)], two)
    assert summary(v) == (False, [("presence", True), ("presence", False)]) and v.score == 0.5
    assert [d.iou for d in v.detections] == [0.9, 0.8]  # kept detections, most confident first
    assert verdict([det("cat", 0.4), det("dog", 0.35), det("person", 0.5)], two).passed  # extra objects pass


def test_counting_uses_the_0_9_threshold_for_every_class_and_the_exclusion():
    two_dogs = entry("counting", {"class": "dog", "count": 2}, exclude=[{"class": "dog", "count": 3}])
    dets = [det("dog", 0.95), det("dog", 0.92), det("dog", 0.85, (100, 0, 140, 40))]
    assert summary(verdict(dets, two_dogs)) == (True, [("count", True), ("count", True)])  # 0.85 is not counted
    assert [len(keep_detections(dets, t)) for t in ("counting", "two_object")] == [2, 3]
    three = dets[:2] + [det("dog", 0.91, (100, 0, 140, 40))]
    v = verdict(three, two_dogs)
    assert summary(v) == (False, [("count", True), ("count", False)]) and v.score == 0.5
    assert v.requirements[1].text == "fewer than 3 dog"
    assert summary(verdict([det("dog", 0.95), det("dog", 0.5)], two_dogs)) == (False, [("count", False), ("count", True)])
    assert keep_detections([det("cat", 0.85), det("cat", 0.95)], "counting") == [1]  # every class, sorted
    assert len(keep_detections([det("dog", 0.5 + i / 100) for i in range(20)], "colors")) == 16  # at most 16 a class


def test_counting_overlap_rule_is_off_by_default_as_in_geneval():
    # GenEval's box IoU counts pixels inclusively: (0,0,9,9) covers 10 x 10 = 100, the overlap (5,0,9,9) 50.
    a, b = (0, 0, 9, 9), (5, 0, 14, 9)
    assert box_iou(a, b) == pytest.approx(50 / 150) and box_iou(a, (20, 20, 29, 29)) == 0.0
    two_dogs = entry("counting", {"class": "dog", "count": 2}, exclude=[{"class": "dog", "count": 3}])
    dets = [det("dog", 0.99, a), det("dog", 0.95, b)]
    assert verdict(dets, two_dogs).passed  # max_overlap = 1.0: overlapping boxes are two dogs
    assert keep_detections(dets, "counting", max_overlap=0.3) == [0]  # 1/3 >= 0.3: the weaker one is dropped
    assert keep_detections(dets, "counting", max_overlap=0.5) == [0, 1]
    kept = keep_detections(dets, "counting", max_overlap=0.3)
    assert not judge([dets[i] for i in kept], two_dogs).passed


def test_colour_is_the_clip_argmax_over_the_most_confident_objects():
    assert colour_from_logits([0.1, 0.3, 0.2, 0, 0, 0, 0, 0, 0, 0.25]) == "orange"
    assert colour_from_logits(np.eye(10)[8] * 0.01) == "black"
    assert colour_from_logits([0.5] * 10) == "red"  # ties go to the first colour, as torch/numpy argmax
    red_car = entry("colors", {"class": "car", "count": 1, "color": "red"})
    cars = [det("car", 0.6), det("car", 0.9), det("cup", 0.9)]
    kept = [cars[i] for i in keep_detections(cars, "colors")]
    assert asked_colours(kept, red_car) == [0]  # only the most confident car's colour is read
    assert kept[0].iou == 0.9 and kept[0].shape == "car"
    paint = lambda dets, colours: [Detection(d.shape, c, d.box, d.area, d.iou) for d, c in zip(dets, colours)]  # noqa: E731
    assert summary(judge(paint(kept, ["red", "blue", None]), red_car)) == (True, [("presence", True), ("color", True)])
    # a red car that is not the most confident one does not count
    assert summary(judge(paint(kept, ["blue", None, "red"]), red_car)) == (False, [("presence", True), ("color", False)])
    attr = entry("color_attr", {"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"})
    assert asked_colours(kept, attr) == [0, 1]
    v = judge(paint(kept, ["red", "green", None]), attr)
    assert summary(v) == (False, [("presence", True), ("color", True), ("presence", True), ("color", False)])
    assert v.score == 0.75 and judge(paint(kept, ["red", "blue", None]), attr).passed
    missing = judge([], red_car)  # no car: the colour cannot hold either
    assert summary(missing) == (False, [("presence", False), ("color", False)]) and asked_colours([], red_car) == []
    two_red = entry("colors", {"class": "car", "count": 2, "color": "red"})
    assert asked_colours(kept, two_red) == [0, 2]
    assert summary(judge(paint(kept, ["red", None, "blue"]), two_red)) == (False, [("count", True), ("color", False)])
    assert judge(paint(kept, ["red", None, "red"]), two_red).passed


def test_position_uses_geneval_margin_and_image_axes():
    dog_left_of_cat = entry("position", {"class": "cat", "count": 1},
                            {"class": "dog", "count": 1, "position": ["left of", 0]})
    cat = det("cat", 0.9, (60, 0, 80, 20))  # centre (70, 10), 20 x 20
    # centre 40: offset -30, margin 0.1 * (20 + 20) = 4 -> -26 / 30 = -0.87 < -0.5: left of
    v = verdict([cat, det("dog", 0.9, (30, 0, 50, 20))], dog_left_of_cat)
    assert summary(v) == (True, [("presence", True), ("presence", True), ("position", True)])
    assert v.requirements[2].text == "dog left of cat"
    # centre 62: offset -8 -> (-8 + 4) / 8 = -0.5, not < -0.5: too close to be left of
    assert summary(verdict([cat, det("dog", 0.9, (52, 0, 72, 20))], dog_left_of_cat))[1][2] == ("position", False)
    right = entry("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]})
    assert not verdict([cat, det("dog", 0.9, (30, 0, 50, 20))], right).passed
    # image y grows downwards: a dog 40 px higher is above; diagonal (-26, -26) / 42.4 = -0.61 is left of and above
    above = entry("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]})
    assert verdict([det("cat", 0.9, (0, 40, 20, 60)), det("dog", 0.9, (0, 0, 20, 20))], above).passed
    assert not verdict([det("cat", 0.9, (0, 0, 20, 20)), det("dog", 0.9, (0, 40, 20, 60))], above).passed
    diagonal = [det("cat", 0.9, (60, 60, 80, 80)), det("dog", 0.9, (30, 30, 50, 50))]
    assert verdict(diagonal, above).passed and verdict(diagonal, dog_left_of_cat).passed
    # no target: the position fails with the target's presence; a weaker dog on the right does not matter
    assert summary(verdict([det("dog", 0.9)], dog_left_of_cat)) == (
        False, [("presence", False), ("presence", True), ("position", False)])
    assert verdict([cat, det("dog", 0.9, (30, 0, 50, 20)), det("dog", 0.5, (90, 0, 110, 20))], dog_left_of_cat).passed


STEP = {"left of": (-300, 0), "right of": (300, 0), "above": (0, -300), "below": (0, 300)}


def perfect_detections(e):
    """Detections that satisfy entry `e`: `count` boxes per item in its colour, placed by its relation."""
    dets, corner = [], {}
    for i, item in enumerate(e["include"]):
        x, y = 1000, 1000 + 2000 * i
        if "position" in item:
            rel, j = item["position"]
            x, y = corner[j][0] + STEP[rel][0], corner[j][1] + STEP[rel][1]
        corner[i] = (x, y)
        dets += [det(item["class"], 0.95, (x + 60 * k, y, x + 60 * k + 40, y + 40), item.get("color"))
                 for k in range(item.get("count", 1))]
    return dets


def check_every_entry(entries):
    for e in entries:
        assert unscorable_reason(e) is None, e
        assert verdict(perfect_detections(e), e).passed, e
        assert not verdict([], e).passed
        first = e["include"][0]
        fewer = [d for d in perfect_detections(e) if d.shape != first["class"]]
        assert not verdict(fewer, e).passed
    check_geneval_metadata(entries)


def test_shipped_subset_of_real_geneval_metadata_is_scorable():
    entries = load_geneval(FIXTURE)  # 54 of GenEval's 553 prompts covering its classes, colours, relations, counts
    assert len(entries) == 54 and {e["tag"] for e in entries} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert {i["class"] for e in entries for i in e["include"]} == set(COCO_CLASSES)
    assert {i["color"] for e in entries for i in e["include"] if "color" in i} == set(COLORS)
    check_every_entry(entries)


def test_real_geneval_metadata_is_scorable(shared_data):
    path = shared_data / "geneval" / "test_metadata.jsonl"
    entries = load_geneval(path)
    assert len(entries) == 2212
    check_every_entry(entries)
    real = {json.dumps(e, sort_keys=True) for e in entries}
    assert all(json.dumps(e, sort_keys=True) in real for e in load_geneval(FIXTURE))


def test_unscorable_entries_are_named():
    ok = entry("single_object", {"class": "dog", "count": 1})
    assert unscorable_reason(ok) is None
    assert "'circle' is not one of GenEval's 80 COCO classes" in unscorable_reason(
        entry("single_object", {"class": "circle", "count": 1}))
    assert "colour 'teal'" in unscorable_reason(entry("colors", {"class": "dog", "count": 1, "color": "teal"}))
    assert "position ['near', 0]" in unscorable_reason(
        entry("position", {"class": "cat"}, {"class": "dog", "position": ["near", 0]}))
    assert "position ['left of', 1]" in unscorable_reason(
        entry("position", {"class": "cat"}, {"class": "dog", "position": ["left of", 1]}))
    assert "count 0" in unscorable_reason(entry("counting", {"class": "dog", "count": 0}))
    assert "no 'include'" in unscorable_reason({"tag": "colors", "prompt": "a red dog"})
    assert "tag None" in unscorable_reason({"prompt": "a dog"})
    with pytest.raises(ValueError, match=r"2 of 3 entries .*entry 2: .*'circle'.*entry 3: tag"):
        check_geneval_metadata([ok, entry("single_object", {"class": "circle"}), {"prompt": "x"}])
