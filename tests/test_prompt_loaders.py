"""Prompt file loaders: text, JSONL, GenEval metadata (the real file when present), clear errors."""
import collections
import json

import pytest

from flowgrpo.prompts.loaders import (GENEVAL_TAGS, PromptFileError, load_geneval, load_jsonl, load_prompts, load_text,
                                      ordered_tags)


def test_real_geneval_metadata_loads_every_entry_and_tag(shared_data):
    path = shared_data / "geneval" / "test_metadata.jsonl"
    rows = load_geneval(path)
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    assert len(rows) == len(lines) == 2212  # 553 prompts x 4 (the file has no final newline: `wc -l` says 2211)
    assert collections.Counter(r["tag"] for r in rows) == {
        "color_attr": 400, "position": 400, "two_object": 396, "colors": 376, "counting": 320, "single_object": 320}
    pos = next(r for r in rows if r["tag"] == "position")
    assert pos["include"][1]["position"][0] in ("left of", "right of", "above", "below")


def test_text_and_jsonl(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("# comment\na red circle\n\n  two squares  \n")
    assert load_text(t) == [{"prompt": "a red circle"}, {"prompt": "two squares"}]
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"caption": "a cat", "id": 3}) + "\n\n" + json.dumps({"caption": "a dog"}) + "\n")
    rows = load_jsonl(j, prompt_key="caption")
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"] and rows[0]["id"] == 3
    assert load_prompts(str(t))[1]["prompt"] == "two squares"
    assert len(load_prompts("shapes:test")) == 300


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": \n', r"p.jsonl:2: invalid JSON"),
    ('{"prompt": ""}\n', r"p.jsonl:1: expected an object with a non-empty string 'prompt'"),
    ('["a list"]\n', r"p.jsonl:1: expected an object"),
    ("", "no prompts"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        load_jsonl(p)


@pytest.mark.parametrize("row, message", [
    ({"tag": 3, "include": [{"class": "a"}], "prompt": "x"}, "m.jsonl:1: 'tag' must be a non-empty string, got 3"),
    ({"include": [{"class": "a"}], "prompt": "x"}, "m.jsonl:1: GenEval metadata needs a 'tag'"),
    ({"tag": "counting", "include": [], "prompt": "x"}, "'include' must be a non-empty list"),
    ({"tag": "counting", "include": [{"class": "a", "count": 0}], "prompt": "x"}, "bad count 0"),
    ({"tag": "position", "include": [{"class": "a"}, {"class": "b", "position": ["left of", 5]}], "prompt": "x"},
     "bad position"),
])
def test_bad_geneval_metadata(tmp_path, row, message):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(row) + "\n")
    with pytest.raises(PromptFileError, match=message):
        load_geneval(p)
    assert set(GENEVAL_TAGS) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_tags_of_the_users_own_load_and_broken_lines_name_file_and_line(tmp_path):
    """T2I-CompBench-style categories are accepted (with or without GenEval requirements); line numbers count
    blank lines, so the error points at the line to fix."""
    p = tmp_path / "mine.jsonl"
    rows = [{"prompt": "a cat on a mat", "tag": "animals"}, {"prompt": "a red circle", "tag": "shapes",
                                                                "include": [{"class": "circle", "count": 1}]}]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    loaded = load_prompts(str(p))
    assert [r["tag"] for r in loaded] == ["animals", "shapes"] and ordered_tags(loaded) == ["animals", "shapes"]
    assert ordered_tags([{"tag": "zebra"}, {"tag": "counting"}, {"tag": "apple"}]) == ["counting", "apple", "zebra"]
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1] | {"include": [{"class": "circle", "count": 0}]}) + "\n")
    with pytest.raises(PromptFileError, match=r"mine.jsonl:3: requirement 0 has a bad count 0"):
        load_prompts(str(p))
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0] | {"tag": ""}) + "\n")
    with pytest.raises(PromptFileError, match=r"mine.jsonl:2: 'tag' must be a non-empty string"):
        load_prompts(str(p))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_text(tmp_path / "nope.txt")
    b = tmp_path / "bin.txt"
    b.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_text(b)
