"""Text-sign prompts give the OCR reward a real task: ground-truth renders read back, wrong words do not."""
import numpy as np
import pytest
import torch

from tests.text_signs import WORDS, render_sign, sign_prompts
from flowgrpo.rewards import build_reward


def _tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.slow
def test_ocr_reward_reads_rendered_signs():
    rng = np.random.default_rng(0)
    prompts = sign_prompts()[::12]  # 3 words, one per template
    assert len(sign_prompts()) == 3 * len(WORDS) and all(p["text"] in p["prompt"] for p in prompts)
    right = _tensor([render_sign(p["text"], rng=rng) for p in prompts])
    wrong = _tensor([render_sign(WORDS[(WORDS.index(p["text"]) + 5) % len(WORDS)], rng=rng) for p in prompts])
    ocr = build_reward("ocr")
    texts = [p["prompt"] for p in prompts]
    good, bad = ocr(right, texts), ocr(wrong, texts)
    assert good.mean() >= 0.9 and bad.mean() <= 0.5
    assert (good > bad).all()
