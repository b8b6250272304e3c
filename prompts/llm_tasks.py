"""Verifiable text tasks for LLM GRPO, with exact checkers as TRL-style reward functions.

The arithmetic task asks "What is 17+25? Answer with just the number." as a chat prompt; a
completion is correct only if, stripped of surrounding whitespace, it is exactly the integer
answer (``correct_answer_reward``); ``final_answer_reward`` checks only the value (the last integer
in the text, so "7 + 5 = 12" counts), a denser signal for small models. Reward functions follow TRL's signature ``fn(prompts, completions, **columns)``, where a
completion is a string or, for chat prompts, a list with one assistant message.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "arithmetic_task", "completion_text", "parse_integer", "last_integer",
    "correct_answer_reward", "final_answer_reward", "integer_format_reward",
]

_INTEGER = re.compile(r"-?\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_task(
    n: int, *, seed: int = 0, max_operand: int = 20, ops: tuple[str, ...] = ("+", "-"), chat: bool = True,
) -> list[dict]:
    """``n`` arithmetic questions ``a op b`` with 0 <= a, b <= max_operand, drawn with ``seed``.

    Each row: ``prompt`` (chat messages if ``chat``, else text), ``answer`` (the integer as a
    string), ``question`` ("17+25") and ``strata`` (the operator, for Stratified GRPO).
    """
    if n < 1 or max_operand < 1:
        raise ValueError(f"need n >= 1 and max_operand >= 1, got n={n}, max_operand={max_operand}")
    unknown = [op for op in ops if op not in _OPS]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {ops!r}")
    g = torch.Generator().manual_seed(seed)
    operands = torch.randint(0, max_operand + 1, (n, 2), generator=g).tolist()
    op_index = torch.randint(0, len(ops), (n,), generator=g).tolist()
    rows = []
    for (a, b), k in zip(operands, op_index):
        op = ops[k]
        question = f"{a}{op}{b}"
        text = f"What is {question}? Answer with just the number."
        prompt = [{"role": "user", "content": text}] if chat else text
        rows.append({"prompt": prompt, "answer": str(_OPS[op](a, b)), "question": question, "strata": op})
    return rows


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion: a string, or the content of a one-message assistant list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


def parse_integer(text: str) -> int | None:
    """The integer if ``text`` is exactly one (surrounding whitespace allowed), else None."""
    stripped = text.strip()
    return int(stripped) if _INTEGER.fullmatch(stripped) else None


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (None if there is none)."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def correct_answer_reward(prompts: list, completions: list, answer: list[str], **_) -> list[float]:
    """1.0 if the completion is exactly the integer ``answer``, else 0.0."""
    return [float(parse_integer(completion_text(c)) == int(a)) for c, a in zip(completions, answer)]


def final_answer_reward(prompts: list, completions: list, answer: list[str], **_) -> list[float]:
    """1.0 if the last integer in the completion is the ``answer``, else 0.0."""
    return [float(last_integer(completion_text(c)) == int(a)) for c, a in zip(completions, answer)]


def integer_format_reward(prompts: list, completions: list, **_) -> list[float]:
    """1.0 if the completion is just an integer (whatever its value), else 0.0."""
    return [float(parse_integer(completion_text(c)) is not None) for c in completions]
