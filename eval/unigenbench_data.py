"""UniGenBench prompt files: `index,prompt_{lang},sub_dims_{lang}` CSVs with testpoints in JSON.

The benchmark's own files come in English (`prompt_en`, keys "Testpoints" / "Testpoint Description")
and Chinese (`prompt_zh`, keys "考点" / "考点对应描述"); short and long variants share the layout.
A testpoint is "Primary - Sub" (e.g. "Attribute - Color", "属性-颜色") or a bare primary ("Style").
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

# sub_dims keys for the testpoint list and its per-testpoint descriptions, by language.
TESTPOINT_KEYS = {"en": ("Testpoints", "Testpoint Description"), "zh": ("考点", "考点对应描述")}


class UniGenBenchFormatError(ValueError):
    """A prompt file that does not follow the UniGenBench CSV format; the message names file and row."""


@dataclass(frozen=True)
class Testpoint:
    """One testpoint. `name` is the sub-dimension key, `primary` its primary dimension."""

    name: str
    primary: str
    sub: str | None


@dataclass(frozen=True, eq=False)
class PromptRow:
    """One benchmark prompt with its testpoints (aligned with `descriptions`)."""

    index: int
    prompt: str
    testpoints: tuple[Testpoint, ...]
    descriptions: tuple[str, ...]
    lang: str
    sub_dims: dict = field(repr=False)


def parse_testpoint(text: str) -> Testpoint:
    """Split "Primary - Sub" at the first hyphen, stripping whitespace from both names.

    The official scorer keeps the space before the hyphen ("Attribute "), which splits one primary
    dimension in two when a file is inconsistent; here "Attribute -Color" and "Attribute - Color" agree.
    """
    text = " ".join(text.split())
    if not text:
        raise ValueError("empty testpoint name")
    if "-" not in text:
        return Testpoint(text, text, None)
    head, tail = text.split("-", 1)
    primary, sub = head.strip(), tail.strip()
    if not primary or not sub:
        raise ValueError(f"testpoint {text!r} has an empty side around '-'")
    # Keep the file's spacing style ("Attribute - Color" vs "属性-颜色") but make it uniform.
    spaced = head != primary or tail != sub
    return Testpoint(f"{primary} - {sub}" if spaced else f"{primary}-{sub}", primary, sub)


def _loads_sub_dims(text: str) -> object:
    """json.loads, repairing only a missing comma between two adjacent strings in a list.

    The released en_long file has one such row (index 509: `"Grammar - Negation" "Attribute - Color"`).
    """
    for _ in range(8):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            before = text[: err.pos].rstrip()
            fixable = err.msg == "Expecting ',' delimiter" and text[err.pos : err.pos + 1] == '"' and before.endswith('"')
            if not fixable:
                raise
            text = before + ", " + text[err.pos :]
    return json.loads(text)


def _language(path: Path, columns: list[str]) -> str:
    langs = [lang for lang in TESTPOINT_KEYS if f"prompt_{lang}" in columns and f"sub_dims_{lang}" in columns]
    if "index" not in columns or len(langs) != 1:
        raise UniGenBenchFormatError(
            f"{path}: expected columns index,prompt_en,sub_dims_en or index,prompt_zh,sub_dims_zh; found {columns}"
        )
    return langs[0]


def _row(raw: dict, lang: str) -> PromptRow:
    try:
        index = int(raw["index"])
    except (TypeError, ValueError):
        raise ValueError(f"index {raw['index']!r} is not an integer") from None
    prompt = (raw[f"prompt_{lang}"] or "").strip()
    if not prompt:
        raise ValueError("empty prompt")
    try:
        sub_dims = _loads_sub_dims(raw[f"sub_dims_{lang}"] or "")
    except json.JSONDecodeError as err:
        raise ValueError(f"sub_dims_{lang} is not valid JSON ({err})") from None
    if not isinstance(sub_dims, dict):
        raise ValueError(f"sub_dims_{lang} must be a JSON object")
    # Accept either language's keys, so a translated file with English keys still loads.
    for tp_key, desc_key in TESTPOINT_KEYS.values():
        if tp_key in sub_dims:
            break
    else:
        raise ValueError(f"sub_dims_{lang} has no testpoint list (keys: {sorted(sub_dims)})")
    names, descriptions = sub_dims.get(tp_key), sub_dims.get(desc_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{tp_key!r} must be a non-empty list of strings")
    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
        raise ValueError(f"{desc_key!r} must be a list of strings")
    if len(descriptions) != len(names):
        raise ValueError(f"{len(names)} testpoints but {len(descriptions)} descriptions")
    testpoints = tuple(parse_testpoint(n) for n in names)
    return PromptRow(index, prompt, testpoints, tuple(d.strip() for d in descriptions), lang, sub_dims)


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Load a UniGenBench prompt CSV (every row validated; `limit` keeps the first rows)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    rows: list[PromptRow] = []
    seen: set[int] = set()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        lang = _language(path, list(reader.fieldnames or []))
        for number, raw in enumerate(reader, start=1):
            if None in raw or any(v is None for v in raw.values()):
                raise UniGenBenchFormatError(f"{path}, data row {number}: wrong number of fields")
            try:
                row = _row(raw, lang)
            except ValueError as err:
                raise UniGenBenchFormatError(f"{path}, data row {number} (index {raw['index']!r}): {err}") from None
            if row.index in seen:
                raise UniGenBenchFormatError(f"{path}, data row {number}: duplicate index {row.index}")
            seen.add(row.index)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise UniGenBenchFormatError(f"{path}: no prompt rows")
    return rows


def write_prompts(path: str | Path, rows: list[PromptRow]) -> None:
    """Write rows in the UniGenBench CSV format (the inverse of `load_prompts`)."""
    langs = {row.lang for row in rows}
    if len(langs) != 1:
        raise ValueError(f"rows mix languages {sorted(langs)}; one file holds one language")
    lang = langs.pop()
    tp_key, desc_key = TESTPOINT_KEYS[lang]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", f"prompt_{lang}", f"sub_dims_{lang}"])
        for row in rows:
            sub_dims = {**row.sub_dims, tp_key: [t.name for t in row.testpoints], desc_key: list(row.descriptions)}
            writer.writerow([row.index, row.prompt, json.dumps(sub_dims, ensure_ascii=False)])
