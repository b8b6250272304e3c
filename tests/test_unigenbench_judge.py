"""The judge prompt and the parsing of judge answers (no network: see test_unigenbench_run for HTTP)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from flowgrpo.eval.judge import EXPLANATIONS, ChatJudge, build_judge_prompt, parse_judge_answer, png_data_url
from flowgrpo.eval.unigenbench_data import PromptRow, load_prompts, parse_testpoint

FIXTURES = Path(__file__).parent / "fixtures"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "unigenbench"


def test_prompt_lists_each_testpoint_with_explanation_and_description():
    row = load_prompts(FIXTURES / "unigenbench_en_small.csv")[0]
    text = build_judge_prompt(row)
    assert "「A watercolor painting of three red apples on a wooden table.」" in text
    for tp, desc in zip(row.testpoints, row.descriptions):
        assert f"\n{tp.name}: {EXPLANATIONS['en'][(tp.primary, tp.sub)]}" in text
        assert f"\n{tp.name}: {desc}" in text
    assert '<checkpoint>["Style", "Attribute - Quantity", "Attribute - Color", "Attribute - Material"]</checkpoint>' in text
    assert "(4 checkpoints)" in text and "<analysis>" in text and "<score>" in text


def test_chinese_rows_get_the_chinese_prompt():
    row = load_prompts(FIXTURES / "unigenbench_zh_small.csv")[1]
    text = build_judge_prompt(row)
    assert "「一只猫坐在门的左边" in text and "共2个考点" in text
    assert "\n实体布局-二维空间: 实体在画面平面内的相对位置" in text and "\n文本生成: “营业中”" in text


def test_repeated_testpoint_is_explained_once_but_described_twice():
    tp = parse_testpoint("Attribute - Color")
    row = PromptRow(0, "a red cat and a blue dog", (tp, tp), ("red cat", "blue dog"), "en", {})
    text = build_judge_prompt(row)
    assert text.count(EXPLANATIONS["en"][("Attribute", "Color")]) == 1
    assert "\nAttribute - Color: red cat" in text and "\nAttribute - Color: blue dog" in text


def test_unknown_testpoint_is_a_clear_error():
    row = PromptRow(3, "p", (parse_testpoint("Attribute - Smell"),), ("roses",), "en", {})
    with pytest.raises(ValueError, match="unknown en testpoint 'Attribute - Smell'"):
        ChatJudge("http://127.0.0.1:9/v1", "m").validate([row])


@pytest.mark.parametrize("name", ["test_prompts_en.csv", "test_prompts_zh.csv", "test_prompts_en_long.csv"])
def test_every_real_testpoint_has_an_explanation(name):
    if not (REAL / name).exists():
        pytest.skip(f"real UniGenBench file {REAL / name} not present (only in the project's shared data folder)")
    rows = load_prompts(REAL / name)
    ChatJudge("http://127.0.0.1:9/v1", "m").validate(rows)
    used = {(t.primary, t.sub) for r in rows for t in r.testpoints}
    assert used == set(EXPLANATIONS[rows[0].lang])  # all 27, and no explanation that the data never uses


ANSWER = ('<description>\n<prompt>p</prompt>\n<checkpoint>["Style", "Attribute - Color"]</checkpoint>\n'
          '<analysis>["ink wash, yes", "the cat is green, not red"]</analysis>\n<score>[1, 0]</score>\n</description>')


@pytest.mark.parametrize("text, n, scores", [
    (ANSWER, 2, [1, 0]),
    ("<analysis>[]</analysis><score>[0,0,1]</score>", 3, [0, 0, 1]),
    ("<analysis>x</analysis><score>\n  [ 1 , 1 ]\n</score>", 2, [1, 1]),
    ("<think>maybe <score>[0]</score></think><analysis>a</analysis><score>[1]</score>", 1, [1]),  # last block wins
])
def test_parse_valid_answers(text, n, scores):
    assert parse_judge_answer(text, n) == scores


@pytest.mark.parametrize("text, n, message", [
    (ANSWER, 3, "2 scores for 3 testpoints"),
    ("<score>[1, 0]</score>", 2, "no <analysis>"),
    ("<analysis>a</analysis> the image is fine", 1, "no <score>"),
    ("<analysis>a</analysis><score>1, 0</score>", 2, "must be a list of 0/1"),
    ("<analysis>a</analysis><score>[1, 2]</score>", 2, "must be a list of 0/1"),
    ("<analysis>a</analysis><score>[1.0, 0]</score>", 2, "must be a list of 0/1"),
    ("<analysis>a</analysis><score>[True, 0]</score>", 2, "must be a list of 0/1"),
    ("<analysis>a</analysis><score>[yes, no]</score>", 2, "not a list"),
    ("<analysis>a</analysis><score>__import__('os')</score>", 1, "not a list"),
])
def test_parse_rejects_malformed_answers(text, n, message):
    with pytest.raises(ValueError, match=message):
        parse_judge_answer(text, n)


def test_png_data_url_round_trips_pixels():
    img = Image.new("RGB", (5, 3), (10, 200, 30))
    img.putpixel((4, 2), (255, 0, 7))
    url = png_data_url(img)
    assert url.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.format == "PNG" and back.convert("RGB").tobytes() == img.tobytes()


def test_chat_judge_url_forms():
    assert ChatJudge("http://h:8000/v1/", "m").url == "http://h:8000/v1/chat/completions"
    assert ChatJudge("http://h:8000/v1/chat/completions", "m").url == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError, match="max_attempts"):
        ChatJudge("http://h/v1", "m", max_attempts=0)
