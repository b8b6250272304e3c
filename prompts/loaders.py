"""Prompt files: plain text (one prompt per line), JSONL, GenEval metadata, and the built-in Shapes sets.

Every loader returns GenEval-style dicts with at least a "prompt" key, and fails with an error that
names the file and line of bad input instead of skipping it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class PromptFileError(ValueError):
    """A prompt file is missing or malformed; the message names the file and line."""


def _read_lines(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file not found: {p}")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e})") from e


def load_text(path: str | Path) -> list[dict]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    out = [{"prompt": line.strip()} for line in _read_lines(path) if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise PromptFileError(f"{path}: no prompts")
    return out


def _jsonl_rows(path: str | Path, prompt_key: str = "prompt") -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line: a JSON object with a non-empty string `prompt_key`."""
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get(prompt_key), str) or not row[prompt_key].strip():
            raise PromptFileError(f"{path}:{n}: expected an object with a non-empty string {prompt_key!r}")
        out.append((n, {**row, "prompt": row[prompt_key]}))
    if not out:
        raise PromptFileError(f"{path}: no prompts")
    return out


def load_jsonl(path: str | Path, *, prompt_key: str = "prompt") -> list[dict]:
    """One JSON object per line, each with a string `prompt_key` (copied to "prompt")."""
    return [row for _, row in _jsonl_rows(path, prompt_key)]


def _check_tag(row: dict, where: str) -> None:
    """A category of the user's own (GenEval's six, T2I-CompBench's, ...): any non-empty string."""
    if "tag" in row and (not isinstance(row["tag"], str) or not row["tag"].strip()):
        raise PromptFileError(f"{where}: 'tag' must be a non-empty string, got {row['tag']!r}")


def _check_geneval(row: dict, where: str) -> None:
    """GenEval requirements: what a GenEval-style verifier needs to score an image."""
    if "tag" not in row:
        raise PromptFileError(f"{where}: GenEval metadata needs a 'tag'")
    _check_tag(row, where)
    include = row.get("include")
    if not isinstance(include, list) or not include:
        raise PromptFileError(f"{where}: 'include' must be a non-empty list")
    for i, item in enumerate(include + row.get("exclude", [])):
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            raise PromptFileError(f"{where}: requirement {i} needs a string 'class'")
        if not isinstance(item.get("count", 1), int) or item.get("count", 1) < 1:
            raise PromptFileError(f"{where}: requirement {i} has a bad count {item.get('count')!r}")
        pos = item.get("position")
        if pos is not None and not (isinstance(pos, list) and len(pos) == 2 and isinstance(pos[1], int)
                                    and 0 <= pos[1] < len(include)):
            raise PromptFileError(f"{where}: requirement {i} has a bad position {pos!r}")


def load_geneval(path: str | Path) -> list[dict]:
    """GenEval metadata JSONL: {"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?, "prompt"}."""
    rows = _jsonl_rows(path)
    for n, row in rows:
        _check_geneval(row, f"{path}:{n}")
    return [row for _, row in rows]


def load_prompts(source: str) -> list[dict]:
    """A prompt source by name: 'shapes:train' / 'shapes:test', or a .txt / .jsonl file. JSONL rows may carry a
    'tag' of the user's own (sampling balances over the tags present, reports go per tag) and GenEval requirements
    ('include', checked when present)."""
    if source.startswith("shapes:"):
        from flowgrpo.prompts.shapes import load_split

        return load_split(source.split(":", 1)[1])
    if source.endswith(".jsonl"):
        rows = _jsonl_rows(source)
        for n, row in rows:
            _check_geneval(row, f"{source}:{n}") if "include" in row else _check_tag(row, f"{source}:{n}")
        return [row for _, row in rows]
    return load_text(source)


def ordered_tags(entries: list[dict]) -> list[str]:
    """The tags present, GenEval's six in their order first, then any others alphabetically."""
    present = {e["tag"] for e in entries if "tag" in e}
    return [t for t in GENEVAL_TAGS if t in present] + sorted(present - set(GENEVAL_TAGS))


def tag_balanced_indices(entries: list[dict], n: int, rng: np.random.Generator,
                         weights: dict[str, float] | None = None) -> np.ndarray:
    """n entry indices: a tag among those present (uniform, or in proportion to ``weights``, 1 for unlisted tags),
    then a uniform entry of that tag."""
    present = ordered_tags(entries)
    by_tag = [np.array([i for i, e in enumerate(entries) if e["tag"] == t]) for t in present]
    if weights:
        p = np.array([weights.get(t, 1.0) for t in present], dtype=float)
        tags = rng.choice(len(by_tag), size=n, p=p / p.sum())
    else:
        tags = rng.integers(len(by_tag), size=n)
    return np.array([by_tag[t][rng.integers(len(by_tag[t]))] for t in tags])
