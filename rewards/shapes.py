"""The Shapes verifier as a reward: GenEval-style exact checks on the embedded Shapes world."""
from __future__ import annotations

import numpy as np
import torch

from flowgrpo.media import to_uint8
from flowgrpo.rewards.base import Reward
from flowgrpo.shapes.verify import Requirement, asked_objects, spare_objects, verify


def form(dets) -> float:
    """How well the drawn objects fit ideal shapes: mean template IoU of the detected components, a malformed one
    (merged, stretched, ragged) counting 0; 0 if there are none.

    Unlike pass/fail checks it varies between images whose layout is already fixed, so late denoising steps,
    where shapes take form, get a ranking inside a group.
    """
    return float(np.mean([d.iou if d.shape else 0.0 for d in dets])) if dets else 0.0


def gated_score(requirements) -> float:
    """Fraction of requirements met, where the image-wide ones (no extra objects, no malformed objects; item -1)
    count only once everything the prompt asks for is there.

    The plain fraction pays for drawing less: one clean object for "a circle and a square" scores 2/3 (presence,
    quality), two clean circles for "three circles" 2/3 (fewer than four, quality), an empty image 1/2 for "a
    circle" — more than most honest attempts at the harder layout. Gated, those score 1/3, 0 and 0.
    """
    asked = [r.ok for r in requirements if r.item >= 0]
    extra = [r.ok for r in requirements if r.item < 0]
    return (sum(asked) + (sum(extra) if all(asked) else 0)) / len(requirements)


def no_extra_objects(verdict, meta: dict, asked: bool = False) -> Requirement:
    """No more well-formed objects than the prompt asks for in total (`spare_objects`); rendered ground truth never
    has spares. Image-wide (item -1) by default; with `asked` it joins the asked-for items (a new item index), so
    under `gated` a spare object costs what a missing one costs."""
    ok = spare_objects(verdict.detections, meta) == 0
    return Requirement("count", f"at most {asked_objects(meta)} objects", ok, len(meta["include"]) if asked else -1)


# mode -> the score of one image's requirement list
SCORES = {"partial": lambda reqs: sum(r.ok for r in reqs) / len(reqs), "gated": gated_score,
          "strict": lambda reqs: float(all(r.ok for r in reqs))}
MODES = tuple(SCORES)


class ShapesReward(Reward):
    """`partial`: fraction of the entry's requirements met (dense); `gated`: the same, but "no extra objects" and
    "no malformed objects" count only once all asked-for objects are right (`gated_score`); `strict`: 1 if all
    are met (GenEval accuracy).

    `form_weight` > 0 adds that weight times `form` (the objects' mean template IoU) to either score.
    `exact` adds the requirement `no_extra_objects` to every entry (training only: evaluation keeps GenEval's rule):
    `true` as an image-wide requirement, `"asked"` as one of the asked-for items (they differ only under `gated`).
    """

    name = "shapes"

    def __init__(self, mode: str = "partial", form_weight: float = 0.0, exact: bool | str = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ShapesReward mode must be one of {MODES}, got {mode!r}")
        if not 0 <= form_weight <= 1:
            raise ValueError(f"ShapesReward form_weight must be in [0, 1], got {form_weight}")
        if not (isinstance(exact, bool) or exact == "asked"):
            raise ValueError(f"ShapesReward exact must be true, false or 'asked', got {exact!r}")
        self.mode = mode
        self.form_weight = form_weight
        self.exact = exact

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        out = []
        for img, meta in zip(to_uint8(images), metadata):
            if "include" not in meta:
                raise ValueError(f"the shapes reward needs GenEval metadata ('include') for prompt {meta.get('prompt')!r}")
            v = verify(img, meta)
            reqs = v.requirements + [no_extra_objects(v, meta, self.exact == "asked")] if self.exact else v.requirements
            out.append(SCORES[self.mode](reqs) + self.form_weight * form(v.detections))
        return torch.tensor(out)


def shapes_judge(temperature: float = 0.1, mode: str = "partial", form_weight: float = 0.0, exact: bool | str = False):
    """Pairwise Shapes comparator for Pref-GRPO: Bradley-Terry over the verifier's score."""
    from flowgrpo.rewards.pairwise import PointwiseAsPairwise

    return PointwiseAsPairwise(ShapesReward(mode, form_weight, exact), temperature)
