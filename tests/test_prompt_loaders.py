"""Prompt file loaders: text, JSONL, GenEval metadata (the real file when present), clear errors."""
import collections
import json

import pytest

from flowgrpo.prompts.loaders import GENEVAL_TAGS, PromptFileError, load_geneval, load_jsonl, load_prompts, load_text


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
    ({"tag": "shapes", "include": [{"class": "a"}], "prompt": "x"}, "tag 'shapes' is not one of"),
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


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_text(tmp_path / "nope.txt")
    b = tmp_path / "bin.txt"
    b.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_text(b)
