"""OCR reward: hand-checked edit-distance scoring and real rapidocr reads of PIL-rendered words."""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowgrpo.rewards import build_reward
from flowgrpo.rewards.ocr import levenshtein, quoted_text, text_match_score


def render(words, size=(256, 96), font_size=40):
    """Black words on white, as a [3,H,W] float tensor in [0,1]."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((12, 24), words, fill="black", font=ImageFont.load_default(size=font_size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3),
                                    ("abc", "abc", 0), ("HELL0", "HELLO", 1)])
def test_levenshtein_hand_cases(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_quoted_text():
    assert quoted_text('a sign that says "HELLO"') == "HELLO"
    assert quoted_text("a mug printed with “good morning”") == "good morning"
    assert quoted_text('"OPEN" above "24h"') == "OPEN24h"
    assert quoted_text("a red circle") is None


def test_text_match_score_hand_cases():
    assert text_match_score("HELL0", "HELLO") == pytest.approx(1 - 1 / 5)
    assert text_match_score("hello world", "HELLOWORLD") == 1.0  # case and spaces ignored
    assert text_match_score("hello", "HELLO", case_sensitive=True) == 0.0  # 5 substitutions of 5
    assert text_match_score("", "HI") == 0.0
    assert text_match_score("XXXXXXXX", "HI") == 0.0  # distance 8 is capped at |target| = 2
    assert text_match_score("HELLOO", "HELLO") == pytest.approx(0.8)
    assert math.isnan(text_match_score("anything", "  "))


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr", num_threads=1)


def test_ocr_reads_rendered_words(ocr):
    assert ocr.read(render("HELLO")) == "HELLO"
    assert ocr.read(render("GRPO 2025")).replace(" ", "") == "GRPO2025"


def test_ocr_reward_scores_rendered_text(ocr):
    images = torch.stack([render("HELLO"), render("HELLO"), render("FLOW"), torch.ones(3, 96, 256)])
    prompts = ['a sign that says "HELLO"', 'a sign that says "WORLD"', "a poster with no quoted text",
               'a blank sign that should say "HI"']
    out = ocr(images, prompts, None)
    # HELLO vs WORLD: lev("hello", "world") = 4 -> 1 - 4/5; the blank image reads nothing -> 0.
    assert out[0].item() == 1.0
    assert out[1].item() == pytest.approx(0.2)
    assert math.isnan(out[2].item())
    assert out[3].item() == 0.0
    assert ocr.stats["nan"] == 1


def test_ocr_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"det_model='.*nope\.onnx' is not an existing local file"):
        build_reward("ocr", det_model=str(tmp_path / "nope.onnx"))
