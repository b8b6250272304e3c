"""Evaluation of text policies: greedy and sampled completions, the mean reward per function, pass@k by its
unbiased estimator, periodic evaluation during `GRPO.train`, and the renamed API's old names."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from flowgrpo.llm import GRPO
from flowgrpo.llm_eval import TextEvaluator, pass_at_k
from tests.tiny_llm import build_tiny_causal_lm

PROMPTS = [{"prompt": p} for p in ["ab", "xyz", "hello", "q", "12+3", "zz", "k", "mn"]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny"), seed=2)


def distinct(prompts, completions, **_):
    return [len(set(c)) / 8 for c in completions]


def has_a(prompts, completions, **_):
    return [float("a" in c) for c in completions]


def _grpo(path, **kw):
    model, tok = AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    return GRPO(model, tok, distinct, **({"group_size": 4, "prompts_per_iter": 2, "max_new_tokens": 8, "lr": 1e-2}
                                         | kw))


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_greedy_evaluation_is_the_most_probable_completion_and_scores_it(path):
    tr = _grpo(path)
    result = tr.evaluate(PROMPTS, [distinct, has_a], batch=3)
    greedy = tr.policy.rollout([r["prompt"] for r in PROMPTS], keys=[(0, i) for i in range(8)], greedy=True)
    assert [c[0] for c in result.completions] == greedy.completions
    s = result.summary()
    assert s["n_prompts"] == 8 and s["samples_per_prompt"] == 1 and "pass@1" not in s
    assert s["reward_by_fn"]["has_a"] == pytest.approx(sum("a" in c for c in greedy.completions) / 8)
    assert s["reward"] == pytest.approx(sum(len(set(c)) / 8 + ("a" in c) for c in greedy.completions) / 8)
    assert tr.evaluate(PROMPTS, [distinct, has_a], batch=8).completions == result.completions


def test_sampled_evaluation_gives_pass_at_k_and_does_not_depend_on_the_batch(path, tmp_path):
    tr = _grpo(path)
    a = tr.evaluate(PROMPTS, has_a, samples=4, k=2, correct_at=1.0, batch=2)
    b = tr.evaluate(PROMPTS, has_a, samples=4, k=2, correct_at=1.0, batch=5)
    assert a.completions == b.completions and len({c for cs in a.completions for c in cs}) > 8  # sampled, keyed
    correct = [sum("a" in c for c in cs) for cs in a.completions]
    assert a.summary()["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in correct) / 8)
    assert "pass@2" in a.line() and a.metrics()["eval/pass@2"] == a.summary()["pass@2"]
    out = a.write(tmp_path / "eval")
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in rows] == a.completions and json.loads((out / "results.json").read_text())
    with pytest.raises(ValueError, match="greedy decoding gives one completion"):
        TextEvaluator(PROMPTS, [has_a], samples=2, k=1, greedy=True)


def test_train_evaluates_before_periodically_and_at_the_end(path, tmp_path):
    tr = _grpo(path, out=str(tmp_path))
    tr.train(PROMPTS, iterations=5, progress=False, eval_dataset=PROMPTS[:4], eval_every=2,
             eval_options={"samples": 2, "correct_at": 0.5})
    assert [h["iteration"] for h in tr.history_eval] == [0, 2, 4, 5]
    assert all("pass@2" in h and math.isfinite(h["reward"]) for h in tr.history_eval)
    assert (tmp_path / "eval" / "iter00005" / "completions.jsonl").is_file()
    table = tr.evaluator(PROMPTS[:4], samples=2, correct_at=0.5).table({"base": tr.history_eval[0],
                                                                       "trained": tr.history_eval[-1]})
    assert table.splitlines()[0] == "| model | eval reward | pass@2 | distinct |"


def test_the_old_step_names_still_work_with_a_warning(path):
    tr = _grpo(path)
    with pytest.warns(FutureWarning, match=r"GRPO.step\(\) is now GRPO.iterate\(\)"):
        tr.step(PROMPTS[:2])
    with pytest.warns(FutureWarning, match="GRPO.step_count is now GRPO.iteration"):
        assert tr.step_count == 1
    with pytest.warns(FutureWarning, match=r"train\(num_steps=...\) is now GRPO.train\(iterations=...\)"):
        tr.train(PROMPTS, num_steps=2, progress=False)
    assert tr.iteration == 2 and torch.is_tensor(tr.policy.rollout(["ab"], keys=[(1,)]).completion_ids)
