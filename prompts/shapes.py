"""The Shapes prompt set in GenEval metadata format, with fixed train/test splits.

The world has 126 distinct prompts over six GenEval tags. `train` lists every distinct prompt;
`test` lists 50 entries per tag (300), cycling through a tag's distinct prompts in a fixed order,
so every tag weighs the same in the overall score (overall = mean over tags, as in GenEval).
Test prompts therefore also occur in training: the world is small and finite by design.
"""
from __future__ import annotations

import itertools
import random

from flowgrpo.shapes import world as W

TEST_PER_TAG = 50


def _entry(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    entry = {"tag": tag, "include": include, "prompt": prompt}
    if exclude:
        entry["exclude"] = exclude
    return entry


def all_prompts() -> list[dict]:
    """Every distinct Shapes prompt, grouped by tag in a fixed order."""
    out: list[dict] = []
    for s in W.SHAPES:
        out.append(_entry("single_object", [{"class": s, "count": 1}], f"a photo of a {s}"))
    for a, b in itertools.permutations(W.SHAPES, 2):
        out.append(_entry("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}],
                          f"a photo of a {a} and a {b}"))
    for s in W.SHAPES:
        for n, word in W.NUMBER_WORDS.items():
            out.append(_entry("counting", [{"class": s, "count": n}], f"a photo of {word} {W.PLURALS[s]}",
                              exclude=[{"class": s, "count": n + 1}]))
    for c in W.COLORS:
        for s in W.SHAPES:
            out.append(_entry("colors", [{"class": s, "count": 1, "color": c}], f"a photo of a {c} {s}"))
    for a, b in itertools.permutations(W.SHAPES, 2):
        for rel in W.RELATIONS:
            out.append(_entry("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                              f"a photo of a {a} {rel} a {b}"))
    for a, b in itertools.permutations(W.SHAPES, 2):
        for ca, cb in itertools.permutations(W.COLORS, 2):
            out.append(_entry("color_attr", [{"class": a, "count": 1, "color": ca},
                                             {"class": b, "count": 1, "color": cb}],
                              f"a photo of a {ca} {a} and a {cb} {b}"))
    return out


def load_split(split: str) -> list[dict]:
    """`train` (all distinct prompts) or `test` (50 per tag, fixed order)."""
    prompts = all_prompts()
    if split == "train":
        return prompts
    if split != "test":
        raise ValueError(f"unknown Shapes split {split!r}; use 'train' or 'test'")
    rng = random.Random(0)
    test: list[dict] = []
    for tag in W.TAGS:
        pool = [p for p in prompts if p["tag"] == tag]
        rng.shuffle(pool)
        test.extend(pool[i % len(pool)] for i in range(TEST_PER_TAG))
    return test


def canonical_key(meta: dict) -> tuple:
    """A key equal for prompts that ask the same thing ('A and B' == 'B and A', 'A left of B' == 'B right of A')."""
    include = meta["include"]
    pos = [(i, it) for i, it in enumerate(include) if "position" in it]
    if pos:
        (i, item), = pos
        rel, j = item["position"]
        a, b = item["class"], include[j]["class"]
        flip = {"right of": "left of", "below": "above"}
        if rel in flip:
            a, b, rel = b, a, flip[rel]
        return ("position", a, rel, b)
    objs = sorted((it["class"], int(it.get("count", 1)), it.get("color") or "") for it in include)
    excl = sorted((it["class"], int(it["count"])) for it in meta.get("exclude", []))
    return ("objects", tuple(objs), tuple(excl))
