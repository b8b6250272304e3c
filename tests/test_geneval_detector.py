"""GenEval's protocol without mmdet: the rules on hand-built detections (hand-computed verdicts for every tag),
the real metadata, the mmdetection-style post-processing on hand-made logits, and the whole scorer, reward, service
and CLI on tiny random Mask2Former and CLIP checkpoints built from config and loaded from local directories."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowgrpo.cli import main
from flowgrpo.eval.geneval import score_images
from flowgrpo.eval.geneval_images import load_geneval_images
from flowgrpo.prompts.loaders import load_geneval
from flowgrpo.rewards import build_reward
from flowgrpo.rewards.geneval_detector import GenevalScorer, coco_label_map, instances, masked_crop
from flowgrpo.rewards.geneval_rules import (
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
from flowgrpo.shapes.verify import Detection
from tests.tiny_geneval import tiny_clip, tiny_detector

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


def test_equal_confidences_put_the_later_detection_first_as_genevals_reversed_argsort():
    scores = [0.8, 0.5, 0.8, 0.8]
    assert np.argsort(np.array(scores))[::-1].tolist() == [3, 2, 0, 1]  # the reference's own ordering
    dogs = [det("dog", s) for s in scores]
    assert keep_detections(dogs, "colors") == [3, 2, 0, 1]
    red_car = entry("colors", {"class": "car", "count": 1, "color": "red"})
    cars = [Detection("car", "red", (0, 0, 9, 9), 100, 0.7), Detection("car", "blue", (20, 0, 29, 9), 100, 0.7)]
    kept = [cars[i] for i in keep_detections(cars, "colors")]
    # the colour is read on the later of the two equally confident cars: blue, so the verdict fails
    assert kept[0].color == "blue" and not judge(kept, red_car).passed
    swapped = cars[::-1]
    assert judge([swapped[i] for i in keep_detections(swapped, "colors")], red_car).passed


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


# ---------------------------------------------------------------- detector outputs -> detections

def test_instances_follow_mmdetection_mask2former_postprocessing():
    ln = math.log
    # softmax rows: query 0 -> dog 0.6, cat 0.1, car 0.1 (no object 0.2); query 1 -> car 0.7
    class_logits = torch.tensor([[ln(6), 0.0, 0.0, ln(2)], [0.0, 0.0, ln(7), 0.0]])
    mask_logits = torch.full((2, 4, 4), -ln(3))
    mask_logits[0, 1:3, 0:2] = ln(3)  # 4 pixels at sigmoid 0.75
    mask_logits[1, 3, 3], mask_logits[1, 0, 3] = ln(9), ln(4)  # sigmoid 0.9 and 0.8
    labels = {0: "dog", 1: "cat", 2: "car"}
    dets, masks = instances(class_logits, mask_logits, labels, floor=0.3)
    assert [(d.shape, d.box, d.area) for d in dets] == [("car", (3, 0, 4, 4), 2), ("dog", (0, 1, 2, 3), 4)]
    assert [d.iou for d in dets] == pytest.approx([0.7 * 0.85, 0.6 * 0.75])  # class prob x mean sigmoid in mask
    assert masks[1].sum() == 4 and masks[1][1:3, 0:2].all() and masks[0].dtype == bool
    assert [d.shape for d in instances(class_logits, mask_logits, labels, floor=0.65)[0]] == ["car"]
    assert [d.shape for d in instances(class_logits, mask_logits, {0: "dog"}, floor=0.3)[0]] == ["dog"]  # car: N/A
    mask_logits[1] = -1.0  # an empty mask is no object
    assert [d.shape for d in instances(class_logits, mask_logits, labels, floor=0.3)[0]] == ["dog"]
    up = instances(class_logits, mask_logits, labels, 0.3, lambda m: m.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert up[0][0].box == (0, 2, 4, 6) and up[1][0].shape == (8, 8)


def test_coco_label_map_reads_port_spellings_and_refuses_other_models():
    voc = {i: {"motorcycle": "motorbike", "tv": "tvmonitor", "couch": "sofa"}.get(c, c) for i, c in enumerate(COCO_CLASSES)}
    assert coco_label_map(voc)[3] == "motorcycle" and coco_label_map(voc)[62] == "tv"
    detr = {0: "N/A"} | {i + 1: c.replace("computer ", "").replace("tv remote", "remote") for i, c in enumerate(COCO_CLASSES)}
    mapped = coco_label_map(detr)
    assert 0 not in mapped and mapped[65] == "computer mouse" and mapped[66] == "tv remote" and len(mapped) == 80
    with pytest.raises(ValueError, match=r"lack 79 of the 80 COCO classes.*COCO instance-segmentation model"):
        coco_label_map({0: "person", 1: "wall"})


def test_masked_crop_puts_geneval_grey_outside_the_mask():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 1] = mask[2, 2] = True
    crop = masked_crop(image, mask, (1, 1, 3, 3))
    assert crop.shape == (2, 2, 3) and crop.dtype == np.uint8
    assert (crop[0, 0] == image[1, 1]).all() and (crop[1, 1] == image[2, 2]).all()
    assert (crop[0, 1] == 153).all() and (crop[1, 0] == 153).all()


# ---------------------------------------------------------------- tiny real models, end to end

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A detector whose 8 queries all see a confident dog (random masks), a random CLIP, and a non-COCO detector."""
    root = tmp_path_factory.mktemp("geneval_models")
    return (tiny_detector(root / "dog_detector", {"dog": 12.0}), tiny_clip(root / "clip"),
            tiny_detector(root / "random_detector"))


DOG = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
RED_DOG = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"}
TWO_DOGS = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
            "prompt": "a photo of two dogs"}


def images(n, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_scorer_end_to_end_on_tiny_models(models):
    detector, clip, random_detector = models
    scorer = GenevalScorer(str(detector), str(clip), detector_size=64, batch_size=3)  # batches of 3 and 1
    imgs, entries = images(4), [DOG, CAT, RED_DOG, TWO_DOGS]
    verdicts = scorer.score_batch(imgs, entries)
    # every query is a confident dog with a non-empty mask: 8 dogs in each image, whatever the tag
    for v, img in zip(verdicts, imgs):
        assert len(v.detections) == 8 and {d.shape for d in v.detections} == {"dog"}
        assert all(0.9 < d.iou <= 1 and 0 < d.area <= 48 * 64 for d in v.detections)
        assert all(0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 48 for d in v.detections)
        assert [d.iou for d in v.detections] == sorted((d.iou for d in v.detections), reverse=True)
    assert [summary(v) for v in (verdicts[0], verdicts[1], verdicts[3])] == [
        (True, [("presence", True)]), (False, [("presence", False)]), (False, [("count", True), ("count", False)])]
    # colour: CLIP's argmax on the most confident dog, masked and cropped, against "a photo of a {c} dog", ...
    dets, masks = scorer.detect([imgs[2]], [0.3])[0]
    top = keep_detections(dets, "colors")[0]
    logits = scorer.colour_logits([masked_crop(imgs[2], masks[top], dets[top].box)], ["dog"])[0]
    colour = colour_from_logits(logits.numpy())
    assert [d.color for d in verdicts[2].detections] == [colour] + [None] * 7
    assert summary(verdicts[2]) == (colour == "red", [("presence", True), ("color", colour == "red")])
    # GenEval's classifier: per colour, the renormalised mean of its three normalised prompt embeddings
    text = scorer.clip.text_embeds(["a photo of a pink dog", "a photo of a pink-colored dog", "a photo of a pink object"])
    assert torch.allclose(scorer.classifier("dog")[6], torch.nn.functional.normalize(text.mean(0), dim=0), atol=1e-6)
    # one image at a time gives the same verdicts as the batches
    for img, e, v in zip(imgs, entries, verdicts):
        alone = scorer(img, e)
        assert summary(alone) == summary(v) and [d.box for d in alone.detections] == [d.box for d in v.detections]
        assert [d.iou for d in alone.detections] == pytest.approx([d.iou for d in v.detections], abs=1e-5)
    # the per-tag report runs on the scorer unchanged
    r = score_images(imgs, entries, scorer)
    assert r.accuracy["single_object"] == 0.5 and r.accuracy["counting"] == 0.0
    assert r.count_errors["+2"] == 1.0 and r.failures["counting"] == {"count": 1.0} and r.spares["single_object"] == 1.0
    # a random detector is unsure of everything: nothing passes the threshold
    assert GenevalScorer(str(random_detector), str(clip), detector_size=64)(imgs[0], DOG).detections == []


def test_missing_paths_and_wrong_models_are_named(models, tmp_path):
    detector, clip, _ = models
    with pytest.raises(FileNotFoundError, match=r"detector_path='.*nope' is not an existing local directory"):
        GenevalScorer(str(tmp_path / "nope"), str(clip))
    with pytest.raises(FileNotFoundError, match=r"clip_path='.*no_clip' is not an existing local directory"):
        GenevalScorer(str(detector), str(tmp_path / "no_clip"))
    with pytest.raises(ValueError, match="option 'detector_path' is required"):
        GenevalScorer("", str(clip))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((detector / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json"):
        GenevalScorer(str(tmp_path / "bare"), str(clip))
    with pytest.raises(ValueError, match="entry 0 .*'a circle'.*'circle' is not one of GenEval's 80 COCO classes"):
        GenevalScorer(str(detector), str(clip), detector_size=64).score_batch(
            images(1), [{"tag": "single_object", "include": [{"class": "circle"}], "prompt": "a circle"}])


def test_geneval_reward_partial_strict_and_nan(models):
    detector, clip, _ = models
    batch = torch.from_numpy(np.stack(images(4))).permute(0, 3, 1, 2).float() / 255
    circle = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
    meta = [DOG, TWO_DOGS, {"prompt": "a dog"}, circle]
    opts = dict(detector_path=str(detector), clip_path=str(clip), detector_size=64)
    partial = build_reward("geneval", **opts)
    out = partial(batch, [m["prompt"] for m in meta], meta)
    assert out[:2].tolist() == [1.0, 0.5] and out[2:].isnan().all()  # unscorable -> NaN, never 0
    assert partial.stats["unscorable"] == 2 and partial.stats["nan"] == 2
    strict = build_reward("geneval", mode="strict", **opts)
    assert strict(batch, [m["prompt"] for m in meta], meta)[:2].tolist() == [1.0, 0.0]
    assert strict(batch[2:], ["a", "b"], meta[2:]).isnan().all()  # nothing scorable: no model call
    with pytest.raises(ValueError, match="mode must be one of"):
        build_reward("geneval", mode="gated", **opts)
    with pytest.raises(FileNotFoundError, match="clip_path="):
        build_reward("geneval", detector_path=str(detector), clip_path="/no/clip")


def test_serve_reward_serves_geneval(models):
    detector, clip, _ = models
    config = json.dumps({"detector_path": str(detector), "clip_path": str(clip), "detector_size": 64})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo.cli", "serve-reward", "geneval", "--port", "0",
                             "--reward-options", config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "flowgrpo serve-reward: geneval on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        client = build_reward("remote", url=line.split(" on ")[1].strip(), timeout=60)
        batch = torch.from_numpy(np.stack(images(3))).permute(0, 3, 1, 2).float() / 255
        out = client(batch, ["a dog", "a cat", "?"], [DOG, CAT, {"prompt": "?"}])
        assert out[:2].tolist() == [1.0, 0.0] and math.isnan(out[2].item())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_scores_real_geneval_metadata_with_the_detector(models, tmp_path, capsys):
    detector, clip, _ = models
    meta = tmp_path / "meta.jsonl"
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
           "prompt": "a photo of a dog and a cat"}
    meta.write_text("".join(json.dumps(e) + "\n" for e in (DOG, two, TWO_DOGS)))
    base = ["eval", "geneval", "--prompts", str(meta), "--images-per-prompt", "1", "--num-steps", "2", "--micro-batch", "4"]
    out = tmp_path / "out"
    assert main(base + ["--out", str(out), "--scorer", "detector", "--detector", str(detector), "--clip", str(clip),
                        "--detector-size", "64", "--scorer-device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"] == {"single_object": 1.0, "two_object": 0.0, "counting": 0.0, "overall": pytest.approx(1 / 3)}
    assert results["failures"]["two_object"] == {"presence": 1.0} and results["count_errors"]["+2"] == 1.0
    assert (out / "grid.png").is_file() and "| two_object | 100% |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "o2")]) == 2  # real classes, Shapes verifier
    err = capsys.readouterr().err
    assert "['cat', 'dog']" in err and "--scorer detector --detector PATH --clip PATH" in err
    assert main(base + ["--out", str(tmp_path / "o3"), "--scorer", "detector", "--detector", str(detector)]) == 2
    assert "--scorer detector needs --clip" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o4"), "--scorer", "detector", "--detector", str(tmp_path / "nope"),
                        "--clip", str(clip)]) == 2
    assert "--detector='" in capsys.readouterr().err
    assert main(["eval", "geneval", "--prompts", "shapes:test", "--out", str(tmp_path / "o5"), "--scorer", "detector",
                 "--detector", str(detector), "--clip", str(clip)]) == 2
    assert "is not one of GenEval's 80 COCO classes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "geneval", "--help"])
    assert "--scorer {shapes,detector}" in capsys.readouterr().out


def test_cli_scores_images_in_geneval_folder_layout(models, tmp_path, capsys):
    detector, clip, _ = models
    root = tmp_path / "images"
    for folder, e, n in (("00000", DOG, 2), ("00001", CAT, 1)):
        (root / folder / "samples").mkdir(parents=True)
        (root / folder / "metadata.jsonl").write_text(json.dumps(e))
        for k, img in enumerate(images(n, seed=int(folder))):
            Image.fromarray(img).save(root / folder / "samples" / f"{k:04d}.png")
    (root / "00000" / "grid.png").write_bytes(b"")  # GenEval's optional grid and other files are ignored
    (root / "notes").mkdir()
    loaded, entries = load_geneval_images(root)
    assert len(loaded) == 3 and loaded[0].shape == (48, 64, 3) and entries == [DOG, DOG, CAT]
    out = tmp_path / "out"
    assert main(["eval", "geneval", "--images", str(root), "--out", str(out), "--scorer", "detector", "--detector",
                 str(detector), "--clip", str(clip), "--detector-size", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"]["single_object"] == pytest.approx(2 / 3) and results["n_images"] == {"single_object": 3}
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["eval", "geneval", "--images", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no images in GenEval's layout" in capsys.readouterr().err
