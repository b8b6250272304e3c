"""UniGenBench prompt CSVs: the real release files, our fixtures, testpoint names and bad input."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from flowgrpo.eval.unigenbench_data import UniGenBenchFormatError, load_prompts, parse_testpoint, write_prompts

FIXTURES = Path(__file__).parent / "fixtures"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "unigenbench"
EN_PRIMARIES = {"Action", "Attribute", "Compound", "Entity Layout", "Grammar", "Logical Reasoning",
                "Relationship", "Style", "Text Generation", "World Knowledge"}


def real_file(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real UniGenBench file {path} not present (only in the project's shared data folder)")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sub_dims(testpoints, descriptions) -> str:
    return json.dumps({"Testpoints": testpoints, "Testpoint Description": descriptions})


@pytest.mark.parametrize("text, name, primary, sub", [
    ("Attribute - Color", "Attribute - Color", "Attribute", "Color"),
    ("  Attribute -Color ", "Attribute - Color", "Attribute", "Color"),
    ("Attribute  -   Color", "Attribute - Color", "Attribute", "Color"),
    ("Action - Full-body (Character/Anthropomorphic)", "Action - Full-body (Character/Anthropomorphic)",
     "Action", "Full-body (Character/Anthropomorphic)"),
    ("Style", "Style", "Style", None),
    (" World Knowledge ", "World Knowledge", "World Knowledge", None),
    ("属性-颜色", "属性-颜色", "属性", "颜色"),
    ("动作-人物/拟人手部动作", "动作-人物/拟人手部动作", "动作", "人物/拟人手部动作"),
])
def test_parse_testpoint_splits_at_first_hyphen_and_strips(text, name, primary, sub):
    tp = parse_testpoint(text)
    assert (tp.name, tp.primary, tp.sub) == (name, primary, sub)


@pytest.mark.parametrize("text", ["", "   ", "- Color", "Attribute -"])
def test_parse_testpoint_rejects_empty_sides(text):
    with pytest.raises(ValueError):
        parse_testpoint(text)


@pytest.mark.parametrize("name, lang, count", [
    ("test_prompts_en.csv", "en", 1813), ("test_prompts_zh.csv", "zh", 1813), ("test_prompts_en_long.csv", "en", 3920)])
def test_every_row_of_the_real_files_loads(name, lang, count):
    rows = load_prompts(real_file(name))
    assert len(rows) == 600
    assert [r.index for r in rows] == list(range(600))
    assert all(r.lang == lang and r.prompt and len(r.testpoints) == len(r.descriptions) >= 1 for r in rows)
    assert sum(len(r.testpoints) for r in rows) == count
    primaries = {t.primary for r in rows for t in r.testpoints}
    subs = {t.name for r in rows for t in r.testpoints}
    assert (len(primaries), len(subs)) == (10, 27)  # the benchmark's 10 primary / 27 sub dimensions
    for tp in {t for r in rows for t in r.testpoints}:
        assert tp.primary == tp.primary.strip() and tp.name == " ".join(tp.name.split())
        assert tp.sub is None or (tp.sub == tp.sub.strip() and tp.name.startswith(tp.primary) and tp.name.endswith(tp.sub))
    if lang == "en":
        assert primaries == EN_PRIMARIES


def test_real_en_long_row_with_missing_comma_is_repaired():
    row = load_prompts(real_file("test_prompts_en_long.csv"))[509]
    assert [t.name for t in row.testpoints] == [
        "Action - Full-body (Character/Anthropomorphic)", "Grammar - Negation", "Attribute - Color",
        "Attribute - Material", "Attribute - Expression"]
    assert row.descriptions[2] == "deep sea blue"


def test_real_languages_align_per_prompt():
    en, zh = load_prompts(real_file("test_prompts_en.csv")), load_prompts(real_file("test_prompts_zh.csv"))
    assert [len(r.testpoints) for r in en] == [len(r.testpoints) for r in zh]
    # Style is the one dimension without a hyphen in both languages, so its counts must agree.
    assert sum(t.name == "Style" for r in en for t in r.testpoints) == sum(t.name == "风格" for r in zh for t in r.testpoints) == 250


def test_fixtures_load_with_exact_contents():
    en = load_prompts(FIXTURES / "unigenbench_en_small.csv")
    assert [r.index for r in en] == [0, 1, 2, 3, 4]
    assert en[1].prompt.startswith('A shop sign that reads "OPEN LATE"')
    assert [t.name for t in en[0].testpoints] == ["Style", "Attribute - Quantity", "Attribute - Color", "Attribute - Material"]
    assert en[1].descriptions == ('"OPEN LATE"', "cat to the left of the door", "cat sitting")
    assert en[0].sub_dims["Primary Categories"] == "Art"
    zh = load_prompts(FIXTURES / "unigenbench_zh_small.csv")
    assert [(t.primary, t.sub) for t in zh[1].testpoints] == [("实体布局", "二维空间"), ("文本生成", None)]
    assert load_prompts(FIXTURES / "unigenbench_en_small.csv", limit=2)[-1].index == 1


def test_write_then_load_round_trips(tmp_path):
    for name in ("unigenbench_en_small.csv", "unigenbench_zh_small.csv"):
        rows = load_prompts(FIXTURES / name)
        write_prompts(tmp_path / name, rows)
        again = load_prompts(tmp_path / name)
        assert [(r.index, r.prompt, r.testpoints, r.descriptions, r.lang) for r in again] == \
               [(r.index, r.prompt, r.testpoints, r.descriptions, r.lang) for r in rows]


def test_sloppy_spacing_gives_clean_names(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["index", "prompt_en", "sub_dims_en"],
                     [[7, "a red cube", sub_dims([" Attribute -Color", "Style "], ["red", "photo"])]])
    (row,) = load_prompts(path)
    assert [(t.name, t.primary, t.sub) for t in row.testpoints] == [
        ("Attribute - Color", "Attribute", "Color"), ("Style", "Style", None)]


@pytest.mark.parametrize("cell, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"Subjects": "x"}), "no testpoint list"),
    (sub_dims([], []), "non-empty list of strings"),
    (sub_dims(["Style", 3], ["a", "b"]), "non-empty list of strings"),
    (sub_dims(["Style", "World Knowledge"], ["only one"]), "2 testpoints but 1 descriptions"),
    (sub_dims(["Style"], "painting"), "must be a list of strings"),
    (sub_dims(["- Color"], ["x"]), "empty side"),
])
def test_malformed_rows_name_file_and_row(tmp_path, cell, message):
    good = sub_dims(["Style"], ["photo"])
    path = write_csv(tmp_path / "bad.csv", ["index", "prompt_en", "sub_dims_en"],
                     [[0, "fine", good], [5, "second", cell]])
    with pytest.raises(UniGenBenchFormatError) as err:
        load_prompts(path)
    assert str(path) in str(err.value) and "data row 2 (index '5')" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("rows, message", [
    ([["x", "p", sub_dims(["Style"], ["s"])]], "index 'x' is not an integer"),
    ([[1, "  ", sub_dims(["Style"], ["s"])]], "empty prompt"),
    ([[1, "p", sub_dims(["Style"], ["s"])], [1, "q", sub_dims(["Style"], ["s"])]], "duplicate index 1"),
    ([[1, "p"]], "wrong number of fields"),
    ([], "no prompt rows"),
])
def test_bad_rows_and_files(tmp_path, rows, message):
    path = write_csv(tmp_path / "bad.csv", ["index", "prompt_en", "sub_dims_en"], rows)
    with pytest.raises(UniGenBenchFormatError, match=message):
        load_prompts(path)


def test_wrong_columns_are_reported(tmp_path):
    path = write_csv(tmp_path / "cols.csv", ["index", "prompt", "sub_dims"], [[0, "p", "{}"]])
    with pytest.raises(UniGenBenchFormatError, match=r"expected columns index,prompt_en,sub_dims_en.*found \['index', 'prompt', 'sub_dims'\]"):
        load_prompts(path)


def test_missing_comma_repair_only_touches_adjacent_strings(tmp_path):
    cell = '{"Testpoints": ["Style" "Attribute - Color"], "Testpoint Description": ["oil" "blue"]}'
    path = write_csv(tmp_path / "p.csv", ["index", "prompt_en", "sub_dims_en"], [[0, "p", cell]])
    (row,) = load_prompts(path)
    assert [t.name for t in row.testpoints] == ["Style", "Attribute - Color"] and row.descriptions == ("oil", "blue")
    broken = write_csv(tmp_path / "q.csv", ["index", "prompt_en", "sub_dims_en"],
                       [[0, "p", '{"Testpoints": ["Style"] "Testpoint Description": ["oil"]}']])
    with pytest.raises(UniGenBenchFormatError, match="not valid JSON"):
        load_prompts(broken)


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_prompts(FIXTURES / "unigenbench_en_small.csv", limit=0)
    assert Counter(len(r.testpoints) for r in load_prompts(FIXTURES / "unigenbench_en_small.csv")) == {4: 1, 3: 2, 2: 2}
