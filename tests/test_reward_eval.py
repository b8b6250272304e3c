"""Reward-based evaluation (prompt sets without GenEval metadata): statistics, dispatch rule and report."""
import json
import math

import numpy as np
import pytest

from flowgrpo.eval.evaluators import ImageSampling, RewardEvaluator
from flowgrpo.eval.reward_eval import RewardEvalResult, is_geneval


def _result(rewards):
    images = [np.full((4, 4, 3), 10 * i, dtype=np.uint8) for i in range(len(rewards))]
    return RewardEvalResult(rewards, images, [{"prompt": f"p{i}"} for i in range(len(rewards))])


def test_mean_and_stderr_skip_failed_rewards():
    r = _result([0.2, 0.4, float("nan")])
    assert r.mean == pytest.approx(0.3)
    assert r.stderr == pytest.approx(0.1 / math.sqrt(2))  # population std 0.1 over 2 valid rewards
    assert r.summary() == {"reward": pytest.approx(0.3), "reward_stderr": pytest.approx(0.1 / math.sqrt(2)),
                           "n_images": 3, "n_nan": 1}


def test_geneval_only_when_every_entry_has_requirements():
    geneval = {"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1}]}
    assert is_geneval([geneval, geneval])
    assert not is_geneval([geneval, {"prompt": "a cat"}])


def test_result_reports_its_summary_metrics_line_and_grid(tmp_path):
    r = _result([0.5, 0.25])
    out = r.write(tmp_path / "eval")
    assert json.loads((out / "results.json").read_text())["reward"] == pytest.approx(0.375)
    assert (out / "grid.png").is_file() and r.grid_image().size == r.grid_image(ncols=2).size
    assert r.metrics() == {"eval/reward": pytest.approx(0.375)}
    assert r.line() == "eval reward 0.3750 ± 0.0884"


def test_the_reward_evaluator_tables_base_against_trained():
    evaluator = RewardEvaluator([], None, ImageSampling(1, 2, 4.5, 0))
    records = {"base": _result([0.5, 0.25]).summary(), "trained": _result([0.5, 0.75]).summary()}
    assert evaluator.table(records).splitlines() == [
        "| model | eval reward |", "| --- | --- |", "| base | 0.3750 ± 0.0884 |", "| trained | 0.6250 ± 0.0884 |"]
    assert evaluator.change(records["base"], records["trained"]) == "eval reward 0.3750 -> 0.6250"
    assert evaluator.score(records["trained"]) == (pytest.approx(0.625), pytest.approx(0.125 / math.sqrt(2)))
