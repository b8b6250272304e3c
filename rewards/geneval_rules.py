"""GenEval's scoring rules as pure functions on detections (no models here).

GenEval (Ghosh et al., 2023) scores an image by detecting the 80 COCO classes with an instance-segmentation
model, classifying the colour of each asked-for object with CLIP, and checking the entry's requirements:

- keep detections scoring above 0.3 (0.9 for every class of a `counting` entry, to cut false positives), at
  most 16 per class, most confident first; an optional greedy suppression drops a detection whose box overlaps
  a more confident one of its class by IoU >= `max_overlap` (GenEval's default 1.0 turns it off, so two
  overlapping boxes of one class count as two objects);
- an include item `{class, count}` needs at least `count` detections of the class; its colour and position are
  judged on the `count` most confident of them only; a colour holds when all of those are classified as it;
- a position `[relation, j]` holds when every one of those objects stands in `relation` to every object matched
  by item j (which must itself have passed), by `flowgrpo.shapes.verify.relative_position` (GenEval's margin
  of 0.1 x the two boxes' summed size per axis; "left of" = the object's centre is left of the target's);
- an exclude item `{class, count}` fails when `count` or more detections of the class were kept.

Detections are `flowgrpo.shapes.verify.Detection`s: `shape` = the COCO class name, `color` = the CLIP colour
(None where GenEval does not ask), `box` = (x0, y0, x1, y1) exclusive pixel box of the mask, `area` = mask
pixels and `iou` = the detector's confidence (the field name is the Shapes verifier's).
"""
from __future__ import annotations

import numpy as np

from flowgrpo.shapes.verify import Detection, Requirement, Verdict, relative_position

# GenEval's class names (its object_names.txt), in COCO's category order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# GenEval's colours, in the order of its classifier (argmax ties go to the first).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16  # per class
MAX_OVERLAP = 1.0  # box IoU at which a less confident detection of the same class is dropped; 1.0 = never


def min_score(tag: str) -> float:
    """The confidence a detection must exceed to count for an entry with this tag."""
    return COUNTING_THRESHOLD if tag == "counting" else THRESHOLD


def box_iou(a: tuple, b: tuple) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with GenEval's convention: a box covers x1 - x0 + 1 pixel columns."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def keep_detections(dets: list[Detection], tag: str, *, max_objects: int = MAX_OBJECTS,
                    max_overlap: float = MAX_OVERLAP) -> list[int]:
    """Indices of the detections GenEval keeps for an entry with `tag`, most confident first."""
    floor = min_score(tag)
    kept: list[int] = []
    for cls in dict.fromkeys(d.shape for d in dets):
        # GenEval's order, np.argsort(scores)[::-1] (evaluate_images.py): of equal confidences the later
        # detection comes first, and the colour and position of a count-n item are read on those it puts first.
        of_class = [i for i, d in enumerate(dets) if d.shape == cls]
        order = np.argsort(np.array([dets[i].iou for i in of_class]))[::-1]
        ranked = [of_class[k] for k in order if dets[of_class[k]].iou > floor][:max_objects]
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if max_overlap < 1:
                ranked = [i for i in ranked if box_iou(dets[best].box, dets[i].box) < max_overlap]
    return sorted(kept, key=lambda i: -dets[i].iou)  # stable: each class keeps its order


def asked_colours(dets: list[Detection], entry: dict) -> list[int]:
    """Indices of the detections whose colour the entry's checks read: for each include item with a colour and
    enough detections of its class, the `count` most confident of them (`dets` most confident first)."""
    need: list[int] = []
    for item in entry["include"]:
        if "color" not in item:
            continue
        of_class = [i for i, d in enumerate(dets) if d.shape == item["class"]]
        if len(of_class) >= item.get("count", 1):
            need += [i for i in of_class[: item.get("count", 1)] if i not in need]
    return need


def colour_prompts(cls: str) -> list[list[str]]:
    """GenEval's zero-shot colour prompts for a class: per colour, three templates whose CLIP text embeddings are
    normalised, averaged and renormalised into that colour's classifier row."""
    return [[f"a photo of a {c} {cls}", f"a photo of a {c}-colored {cls}", f"a photo of a {c} object"]
            for c in COLORS]


def colour_from_logits(logits) -> str:
    """The colour whose classifier row scores highest (CLIP similarity to `colour_prompts`)."""
    return COLORS[int(np.argmax(np.asarray(logits, dtype=np.float64)))]


def judge(dets: list[Detection], entry: dict) -> Verdict:
    """GenEval's verdict on the kept detections (most confident first, colours filled by `asked_colours`).

    Requirements follow the Shapes verifier's kinds so reports read the same: presence (count 1) or count,
    color, position per include item, and one count requirement per exclude item. `passed` equals GenEval's
    `correct`; `score` is the fraction of requirements met (a colour or position cannot hold without its count).
    """
    reqs: list[Requirement] = []
    matched: list[list[Detection] | None] = []
    for i, item in enumerate(entry["include"]):
        cls, n = item["class"], int(item.get("count", 1))
        of_class = [d for d in dets if d.shape == cls]
        found = of_class[:n]
        ok = len(of_class) >= n
        reqs.append(Requirement("count" if n > 1 else "presence", f"at least {n} {cls}", ok, i))
        if "color" in item:
            c_ok = ok and all(d.color == item["color"] for d in found)
            reqs.append(Requirement("color", f"{n} {item['color']} {cls}", c_ok, i))
            ok = ok and c_ok
        if "position" in item:
            rel, j = item["position"]
            targets = matched[j]
            p_ok = ok and targets is not None and all(rel in relative_position(d, t) for d in found for t in targets)
            reqs.append(Requirement("position", f"{cls} {rel} {entry['include'][j]['class']}", p_ok, i))
            ok = ok and p_ok
        matched.append(found if ok else None)
    for item in entry.get("exclude", []):
        cls, n = item["class"], int(item["count"])
        reqs.append(Requirement("count", f"fewer than {n} {cls}", sum(d.shape == cls for d in dets) < n, -1))
    return Verdict(all(r.ok for r in reqs), sum(r.ok for r in reqs) / len(reqs), reqs, list(dets))


def unscorable_reason(entry: dict) -> str | None:
    """Why these rules cannot score `entry` (None if they can): GenEval needs a known tag, COCO classes, its
    colours and relations, positive counts, and position targets among the earlier include items."""
    if entry.get("tag") not in TAGS:
        return f"tag {entry.get('tag')!r} is not one of GenEval's {TAGS}"
    include = entry.get("include")
    if not isinstance(include, list) or not include:
        return "no 'include' requirements"
    for i, item in enumerate(include + entry.get("exclude", [])):
        where = f"requirement {i}"
        if not isinstance(item, dict):
            return f"{where} is not an object"
        if item.get("class") not in COCO_CLASSES:
            return f"{where}: class {item.get('class')!r} is not one of GenEval's 80 COCO classes"
        count = item.get("count", 1) if i < len(include) else item.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return f"{where}: count {count!r} is not a positive integer"
        if "color" in item and item["color"] not in COLORS:
            return f"{where}: colour {item['color']!r} is not one of GenEval's {COLORS}"
        if "position" in item:
            pos = item["position"]
            if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                    and isinstance(pos[1], int) and 0 <= pos[1] < i):
                return f"{where}: position {pos!r} is not [one of {RELATIONS}, an earlier include index]"
    return None


def check_geneval_metadata(entries: list[dict]) -> None:
    """Raise a ValueError naming the first entries these rules cannot score."""
    bad = [(n, reason) for n, e in enumerate(entries, 1) if (reason := unscorable_reason(e))]
    if bad:
        listed = "; ".join(f"entry {n}: {reason}" for n, reason in bad[:3])
        raise ValueError(f"{len(bad)} of {len(entries)} entries cannot be scored by GenEval's rules ({listed}"
                         f"{'; ...' if len(bad) > 3 else ''})")
