"""PromptStatTracker: update arithmetic, exact save/restore, bad input."""

import json

import pytest

from flowgrpo.core import PromptStats, PromptStatTracker


def test_unseen_prompt_uses_the_prior():
    tr = PromptStatTracker(prior=(2.0, 6.0))
    assert tr.beta_params("x") == (2.0, 6.0) and tr.beta_mean("x") == 0.25
    assert tr.value("x") is None and tr.stats("x") == PromptStats() and "x" not in tr


def test_observe_beta_decays_old_evidence():
    tr = PromptStatTracker()
    tr.observe_beta("x", [1, 0, 1], decay=0.5)
    assert tr.stats("x") == PromptStats(count=3, successes=2.0, failures=1.0)
    tr.observe_beta("x", [0.25], decay=0.5)  # fractional success is allowed
    assert tr.stats("x") == PromptStats(count=4, successes=1.25, failures=1.25)
    assert tr.beta_mean("x") == 0.5
    tr.observe_beta("x", [], decay=0.0)  # nothing observed: nothing changes
    assert tr.stats("x").successes == 1.25


def test_observe_value_ema():
    tr = PromptStatTracker()
    tr.observe_value("x", [1.0, 3.0], decay=0.9)  # first: the mean
    assert tr.value("x") == 2.0
    tr.observe_value("x", [0.0], decay=0.75)
    assert tr.value("x") == 1.5 and tr.stats("x").count == 3


def test_state_dict_json_round_trip_is_exact():
    tr = PromptStatTracker(prior=(0.5, 1.5))
    tr.observe_beta("a", [0.1, 0.2, 0.7], decay=0.3)
    tr.observe_beta("a", [1 / 3], decay=0.3)
    tr.observe_value("b", [0.1 + 0.2], decay=0.9)
    tr.observe_value("b", [2 / 7], decay=0.9)
    state = json.loads(json.dumps(tr.state_dict()))
    restored = PromptStatTracker()
    restored.load_state_dict(state)
    assert restored.state_dict() == tr.state_dict()
    assert restored.prior == (0.5, 1.5)
    for key in ("a", "b", "new"):
        assert restored.stats(key) == tr.stats(key) and restored.beta_mean(key) == tr.beta_mean(key)
    # the restored tracker evolves identically
    for t in (tr, restored):
        t.observe_beta("a", [0.9], decay=0.7)
    assert restored.state_dict() == tr.state_dict()


def test_stats_returns_a_copy():
    tr = PromptStatTracker()
    tr.observe_beta("a", [1.0])
    tr.stats("a").successes = 100.0
    assert tr.stats("a").successes == 1.0


def test_bad_input():
    tr = PromptStatTracker()
    with pytest.raises(TypeError, match="str"):
        tr.observe_beta(3, [1.0])
    with pytest.raises(ValueError, match="NaN"):
        tr.observe_value("a", [float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tr.observe_beta("a", [1.5])
    with pytest.raises(ValueError, match="decay"):
        tr.observe_beta("a", [1.0], decay=1.5)
    with pytest.raises(ValueError, match="prior"):
        PromptStatTracker(prior=(0.0, 1.0))
    assert len(tr) == 0  # failed updates leave no trace
