"""The embedded arithmetic task and its exact checkers (TRL reward signature)."""

import pytest

from flowgrpo.prompts.llm_tasks import (
    arithmetic_task,
    completion_text,
    correct_answer_reward,
    final_answer_reward,
    integer_format_reward,
    last_integer,
    parse_integer,
)


def test_task_rows_are_seeded_and_answers_are_right():
    rows = arithmetic_task(50, seed=3, max_operand=30, ops=("+", "-", "*"))
    assert rows == arithmetic_task(50, seed=3, max_operand=30, ops=("+", "-", "*"))
    assert rows != arithmetic_task(50, seed=4, max_operand=30, ops=("+", "-", "*"))
    for row in rows:
        a, op, b = next((row["question"].partition(o) for o in "+-*" if o in row["question"]))
        assert 0 <= int(a) <= 30 and 0 <= int(b) <= 30 and op == row["strata"]
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["prompt"] == [{"role": "user",
                                  "content": f"What is {row['question']}? Answer with just the number."}]
    assert {r["strata"] for r in rows} == {"+", "-", "*"}
    plain = arithmetic_task(2, chat=False)
    assert plain[0]["prompt"] == f"What is {plain[0]['question']}? Answer with just the number."


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), (" 42\n", 42), ("-7", -7), ("042", 42),
    ("42.", None), ("The answer is 42", None), ("4 2", None), ("", None), ("+5", None),
])
def test_parse_integer_is_exact(text, value):
    assert parse_integer(text) == value


@pytest.mark.parametrize(("text", "value"), [
    ("7 + 5 = 12", 12), ("The answer is -3.", -3), ("12 apples and 3 pears", 3), ("none", None), ("", None),
])
def test_last_integer(text, value):
    assert last_integer(text) == value


def test_rewards_in_trl_signature_for_text_and_chat_completions():
    prompts = ["q"] * 4
    completions = ["42", " 42\n", "42 apples", "-3"]
    answer = ["42", "42", "42", "3"]
    assert correct_answer_reward(prompts, completions, answer=answer) == [1.0, 1.0, 0.0, 0.0]
    assert integer_format_reward(prompts, completions, answer=answer) == [1.0, 1.0, 0.0, 1.0]
    assert final_answer_reward(prompts, completions + ["3+39=42"], answer=answer + ["42"]) == [1.0, 1.0, 1.0, 0.0, 1.0]
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert correct_answer_reward(prompts, chat, answer=answer, question=["x"] * 4) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="a completion must be"):
        completion_text(7)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="ops must be"):
        arithmetic_task(3, ops=("/",))
    with pytest.raises(ValueError, match="n >= 1"):
        arithmetic_task(0)
