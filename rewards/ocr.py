"""OCR reward: how close the text read from the image (rapidocr) is to the quoted text of the prompt.

target = the double-quoted parts of the prompt ('a sign that says "HELLO"' -> HELLO; several quotes are
concatenated). Both strings are compared without whitespace and, by default, case-insensitively:

    reward = 1 − min(lev(ocr, target), |target|) / |target|        (lev = Levenshtein edit distance)

so 1 is a perfect read and 0 means nothing useful was read. Prompts without quoted text score NaN.
rapidocr ships its ONNX weights inside the package; they are found there (or given explicitly with
``det_model`` / ``cls_model`` / ``rec_model``) and rapidocr is never allowed to download.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from flowgrpo.media import to_uint8
from flowgrpo.rewards.base import Reward, require_file

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def quoted_text(prompt: str) -> str | None:
    """The concatenated double-quoted segments of ``prompt`` (straight or curly quotes), or None if there are none."""
    parts = [straight + curly for straight, curly in _QUOTED.findall(prompt)]  # one of the two groups is ""
    return "".join(parts) if parts else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_match_score(read: str, target: str, case_sensitive: bool = False) -> float:
    """1 − min(lev, |target|)/|target| after dropping whitespace (and case); NaN for an empty target."""
    norm = (lambda s: re.sub(r"\s+", "", s)) if case_sensitive else (lambda s: re.sub(r"\s+", "", s).lower())
    read, target = norm(read), norm(target)
    if not target:
        return float("nan")
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


def _packaged_model(kind: str) -> Path:
    import rapidocr

    found = sorted((Path(rapidocr.__file__).parent / "models").glob(f"*{kind}*.onnx"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one packaged rapidocr {kind} model, found {[p.name for p in found]}; "
                                f"pass {kind}_model=/path/to/model.onnx")
    return found[0]


class OcrReward(Reward):
    """rapidocr (onnxruntime) read of each image scored against the prompt's quoted text."""

    def __init__(self, det_model: str | None = None, cls_model: str | None = None, rec_model: str | None = None,
                 case_sensitive: bool = False, num_threads: int = -1, name: str = "ocr") -> None:
        super().__init__()
        from rapidocr import RapidOCR

        paths = {kind: require_file(given, f"{kind}_model", f"rapidocr {kind} ONNX model") if given
                 else _packaged_model(kind) for kind, given in (("det", det_model), ("cls", cls_model), ("rec", rec_model))}
        # Explicit model paths stop rapidocr from fetching its defaults over the network.
        self.engine = RapidOCR(params={
            "Det.model_path": str(paths["det"]), "Cls.model_path": str(paths["cls"]),
            "Rec.model_path": str(paths["rec"]), "Global.log_level": "warning",
            "EngineConfig.onnxruntime.intra_op_num_threads": num_threads,
        })
        self.case_sensitive, self.name = case_sensitive, name

    def read(self, image: torch.Tensor) -> str:
        """All text rapidocr finds in a [3,H,W] image, concatenated in its reading order."""
        rgb = to_uint8(image[None])[0]
        result = self.engine(np.ascontiguousarray(rgb[..., ::-1]))  # ndarrays are taken as BGR
        return "".join(result.txts or ())

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        out = []
        for image, prompt in zip(images, prompts):
            target = quoted_text(prompt)
            out.append(float("nan") if target is None else text_match_score(self.read(image), target,
                                                                              self.case_sensitive))
        return torch.tensor(out, dtype=torch.float32)
