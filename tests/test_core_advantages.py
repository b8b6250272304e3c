"""Advantage estimators against hand-computed values."""

import json
import math

import pytest
import torch

from flowgrpo.core import (
    ADVANTAGES,
    PromptStatTracker,
    bnpo_beta_params,
    compute_advantages,
    winrate_from_preferences,
)

NAN = float("nan")
S3 = math.sqrt(3.0)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_registry_names():
    assert set(ADVANTAGES) == {"grpo", "rloo", "mc_grpo", "gdpo", "bnpo", "ngrpo", "stratified", "spo", "winrate"}


# --- grpo / Dr.GRPO ---------------------------------------------------------------------------

REWARDS = t(1, 2, 3, 6, 0, 1)
GROUPS = ids(7, 7, 7, 7, 3, 3)


def test_grpo_group_scale_population_std():
    res = compute_advantages("grpo", REWARDS, GROUPS, eps=0.0)
    # group 7: mean 3, population std sqrt((4+1+0+9)/4) = sqrt(3.5); group 3: mean .5, std .5
    s = math.sqrt(3.5)
    close(res.advantages, [-2 / s, -1 / s, 0.0, 3 / s, -1.0, 1.0])
    assert res.valid.all()
    assert res.stats["n_groups"] == 2 and res.stats["n_nan"] == 0


def test_grpo_unbiased_and_eps():
    res = compute_advantages("grpo", REWARDS, GROUPS, unbiased=True)
    s7, s3 = math.sqrt(14 / 3), math.sqrt(0.5)
    close(res.advantages, [-2 / (s7 + 1e-4), -1 / (s7 + 1e-4), 0.0, 3 / (s7 + 1e-4), -0.5 / (s3 + 1e-4), 0.5 / (s3 + 1e-4)])


def test_dr_grpo_scale_none_and_batch():
    none = compute_advantages("grpo", REWARDS, GROUPS, scale="none")
    close(none.advantages, [-2, -1, 0, 3, -0.5, 0.5])
    batch = compute_advantages("grpo", REWARDS, GROUPS, scale="batch", eps=0.0)
    # population std over the whole batch: E[r^2] - E[r]^2 = 51/6 - (13/6)^2
    s = math.sqrt(51 / 6 - (13 / 6) ** 2)
    close(batch.advantages, [v / s for v in (-2, -1, 0, 3, -0.5, 0.5)])


def test_rloo_leave_one_out():
    res = compute_advantages("rloo", t(1, 2, 3, 6, 0, 1, 5), ids(0, 0, 0, 0, 1, 1, 2))
    # 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3; 0 - 1, 1 - 0; alone in its group -> 0
    close(res.advantages, [-8 / 3, -4 / 3, 0.0, 4.0, -1.0, 1.0, 0.0])


# --- MC-GRPO ---------------------------------------------------------------------------------


def test_mc_grpo_median_baseline_mad_and_pivot():
    r = t(0.2, 0.9, 0.5, 0.1, 0.7)  # G + 1 = 5; median 0.5 at index 2
    res = compute_advantages("mc_grpo", r, ids(0, 0, 0, 0, 0))
    # |r - 0.5| = .3 .4 0 .4 .2 -> MAD = 0.3
    d = 0.3 + 1e-3
    close(res.advantages, [-0.3 / d, 0.4 / d, 0.0, -0.4 / d, 0.2 / d], atol=1e-12)
    assert res.valid.tolist() == [True, True, False, True, True]
    # baseline = median: r = median + A * scale for the non-pivot samples
    close(res.advantages[res.valid] * d + 0.5, r[res.valid], atol=1e-12)
    assert res.stats["n_valid"] == 4


def test_mc_grpo_ties_pivot_is_first_by_index_std_scale():
    r = t(1, 0, 1, 0, 1, 4, 4, 4)
    res = compute_advantages("mc_grpo", r, ids(0, 0, 0, 0, 0, 1, 1, 1), scale="std")
    # group 0 sorted stably: 0(i1) 0(i3) 1(i0) 1(i2) 1(i4) -> pivot i0, median 1; std = sqrt(.6*.4)
    s = math.sqrt(0.24) + 1e-3
    close(res.advantages, [0.0, -1 / s, 0.0, -1 / s, 0.0, 0.0, 0.0, 0.0])
    # group 1 is all ties: the middle one by index (i6) is the pivot
    assert res.valid.tolist() == [False, True, True, True, True, True, False, True]


# --- GDPO vs GRPO on two rewards --------------------------------------------------------------


def test_gdpo_separates_reward_combinations_that_grpo_merges():
    # columns: correctness (1,0,0,1) and format (0,1,0,0): different within-group spreads
    r = t(1, 0, 0, 1, 0, 1, 0, 0).reshape(2, 4).T  # rows (1,0) (0,1) (0,0) (1,0)
    g = ids(0, 0, 0, 0)
    grpo = compute_advantages("grpo", r, g, eps=0.0)
    # GRPO sums first: 1, 1, 0, 1 -> mean .75, std sqrt(3)/4
    close(grpo.advantages, [1 / S3, 1 / S3, -S3, 1 / S3])
    assert grpo.advantages[0] == grpo.advantages[1]  # (1,0) and (0,1) collapse

    gdpo = compute_advantages("gdpo", r, g, eps=0.0)
    # column z-scores: (1,-1,-1,1) and (-1/sqrt3, sqrt3, -1/sqrt3, -1/sqrt3); their sum s has
    # mean 0, then s / std(s)
    s = torch.tensor([1 - 1 / S3, -1 + S3, -1 - 1 / S3, 1 - 1 / S3], dtype=torch.float64)
    close(gdpo.advantages, s / s.std(correction=0))
    close(gdpo.advantages, [0.4597008, 0.7962252, -1.7156268, 0.4597008], atol=1e-6)
    assert gdpo.advantages[1] - gdpo.advantages[0] > 0.3


def test_reward_weights_combine_columns_before_grpo():
    r = t(1, 0, 0, 1, 0, 1, 0, 0).reshape(2, 4).T  # rows (1,0) (0,1) (0,0) (1,0)
    res = compute_advantages("grpo", r, ids(0, 0, 0, 0), reward_weights=[2.0, 1.0], scale="none")
    close(res.advantages, [2 - 1.25, 1 - 1.25, 0 - 1.25, 2 - 1.25])
    with pytest.raises(ValueError, match="reward_weights"):
        compute_advantages("grpo", r, ids(0, 0, 0, 0), reward_weights=[1.0])


# --- NGRPO -------------------------------------------------------------------------------------


def test_ngrpo_all_wrong_group_gets_negative_signal():
    r = t(0, 0, 0, 1, 0, 0, 1, 1, 1)
    g = ids(0, 0, 0, 1, 1, 1, 2, 2, 2)
    ng = compute_advantages("ngrpo", r, g, eps=0.0)
    # with the virtual 1: (0,0,0,1) mean .25 std sqrt(3)/4 -> -1/sqrt3; (1,0,0,1) -> +-1; all-1 -> 0
    close(ng.advantages, [-1 / S3] * 3 + [1.0, -1.0, -1.0] + [0.0] * 3)
    plain = compute_advantages("grpo", r, g)
    close(plain.advantages[:3], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="r_max"):
        compute_advantages("ngrpo", t(0, 2), ids(0, 0))


# --- NaN rewards, zero-std groups, clipping --------------------------------------------------------


def test_nan_rewards_are_invalid_excluded_and_counted():
    res = compute_advantages("grpo", t(1, NAN, 3, 5), ids(0, 0, 0, 0), eps=0.0)
    s = math.sqrt(8 / 3)  # mean 3, population std over (1, 3, 5)
    close(res.advantages, [-2 / s, 0.0, 0.0, 2 / s])
    assert res.valid.tolist() == [True, False, True, True]
    assert res.stats["n_nan"] == 1 and res.stats["frac_nan"] == 0.25 and res.stats["n_valid"] == 3


def test_nan_in_one_reward_column_invalidates_the_sample():
    r = t(1, 0, 1, NAN, 0, 1).reshape(3, 2)  # rows (1, 0) (1, NaN) (0, 1)
    for name in ("grpo", "gdpo"):
        res = compute_advantages(name, r, ids(0, 0, 0))
        assert res.valid.tolist() == [True, False, True] and res.stats["n_nan"] == 1
        assert res.advantages[1] == 0


def test_zero_std_groups_counted_kept_or_dropped():
    r = t(1, 1, 1, 0, 1, 0, 2, 2, NAN, 4, 4)
    g = ids(0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    keep = compute_advantages("grpo", r, g)
    assert keep.stats["frac_zero_std"] == 0.75  # groups 0, 2 and 3 (4, 4 after dropping the NaN)
    assert keep.valid.tolist() == [True] * 8 + [False, True, True]
    close(keep.advantages[[0, 1, 2, 6, 7, 9, 10]], [0.0] * 7)
    drop = compute_advantages("grpo", r, g, zero_std="drop")
    assert drop.valid.tolist() == [False] * 3 + [True] * 3 + [False] * 5
    close(drop.advantages, keep.advantages)
    assert drop.stats["n_valid"] == 3


def test_all_nan_group_is_not_a_zero_std_group():
    res = compute_advantages("grpo", t(NAN, NAN, 0, 1), ids(0, 0, 1, 1))
    assert res.stats["frac_zero_std"] == 0.0 and res.stats["n_groups"] == 2


def test_adv_clip_and_stats():
    res = compute_advantages("grpo", t(0, 10, 4, 6), ids(0, 0, 0, 0), scale="none", adv_clip=3.0)
    close(res.advantages, [-3.0, 3.0, -1.0, 1.0])
    assert res.stats["frac_clipped"] == 0.5
    assert res.stats["adv_mean"] == 0.0 and res.stats["adv_std"] == pytest.approx(math.sqrt(5.0))


# --- Pref-GRPO win rates -------------------------------------------------------------------------


def test_winrate_from_preferences_and_normalisation():
    pref = t(0.5, 0.9, 0.6, 0.1, 0.5, 0.3, 0.4, 0.7, 0.5).reshape(3, 3)
    w = winrate_from_preferences(pref)
    close(w, [(0.9 + 0.6) / 2, (0.1 + 0.3) / 2, (0.4 + 0.7) / 2])
    res = compute_advantages("winrate", w, ids(0, 0, 0))
    std = math.sqrt((0.25**2 + 0.3**2 + 0.05**2) / 3)
    close(res.advantages, [0.25 / (std + 1e-8), -0.3 / (std + 1e-8), 0.05 / (std + 1e-8)])


def test_winrate_input_errors():
    with pytest.raises(ValueError, match="G, G"):
        winrate_from_preferences(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        winrate_from_preferences(t(0, 1.5, 0, 0).reshape(2, 2))
    with pytest.raises(ValueError, match="win rates"):
        compute_advantages("winrate", t(0.2, 1.2), ids(0, 0))


# --- Stratified ------------------------------------------------------------------------------------


def test_stratified_alpha_blends_stratum_and_batch_zscores():
    r = t(1, 3, 10, 20, 5)
    strata = ids(0, 0, 1, 1, 2)
    g = ids(0, 0, 0, 0, 0)
    e = 1e-4
    z_stratum = torch.tensor([-1 / (1 + e), 1 / (1 + e), -5 / (5 + e), 5 / (5 + e), 0.0], dtype=torch.float64)
    mean, std = 39 / 5, math.sqrt((1 + 9 + 100 + 400 + 25) / 5 - (39 / 5) ** 2)
    z_batch = (r - mean) / (std + e)
    close(compute_advantages("stratified", r, g, strata=strata, alpha=1.0).advantages, z_stratum)
    close(compute_advantages("stratified", r, g, strata=strata, alpha=0.0).advantages, z_batch)
    blend = compute_advantages("stratified", r, g, strata=strata, alpha=0.25).advantages
    close(blend, 0.25 * z_stratum + 0.75 * z_batch)
    with pytest.raises(ValueError, match="alpha"):
        compute_advantages("stratified", r, g, strata=strata, alpha=1.5)


# --- SPO -----------------------------------------------------------------------------------------


def zscore(x, eps=1e-4):
    x = torch.tensor(x, dtype=torch.float64)
    return (x - x.mean()) / (x.std(correction=0) + eps)


def test_spo_beta_tracker_two_calls():
    tracker = PromptStatTracker()
    keys = ["p", "p", "q"]
    first = compute_advantages("spo", t(1, 0, 1), ids(0, 0, 1), tracker=tracker, prompt_keys=keys, decay=0.5)
    close(first.advantages, zscore([0.5, -0.5, 0.5]))  # unseen prompts: prior mean 0.5
    assert tracker.stats("p").successes == 1 and tracker.stats("p").failures == 1
    assert tracker.stats("q").successes == 1 and tracker.stats("q").failures == 0
    second = compute_advantages("spo", t(1, 1, 0), ids(0, 0, 1), tracker=tracker, prompt_keys=keys, decay=0.5)
    # baselines read before the update: p (1+1)/(2+2) = 0.5, q (1+1)/(1+2) = 2/3
    close(second.advantages, zscore([0.5, 0.5, -2 / 3]))
    # evidence after: p s = .5*1 + 2, f = .5*1; q s = .5*1, f = .5*0 + 1
    assert tracker.beta_params("p") == (1 + 2.5, 1 + 0.5)
    assert tracker.beta_params("q") == (1 + 0.5, 1 + 1.0)


def test_spo_ema_tracker_two_calls():
    tracker = PromptStatTracker()
    keys = ["p", "p", "q"]
    first = compute_advantages("spo", t(1, 0, 1), ids(0, 1, 2), tracker=tracker, prompt_keys=keys, value="ema")
    close(first.advantages, zscore([0.5, -0.5, 0.0]))  # unseen: this batch's mean per prompt
    assert tracker.value("p") == 0.5 and tracker.value("q") == 1.0
    second = compute_advantages("spo", t(1, 1, 0), ids(0, 1, 2), tracker=tracker, prompt_keys=keys, value="ema")
    close(second.advantages, zscore([0.5, 0.5, -1.0]))
    assert tracker.value("p") == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    assert tracker.value("q") == pytest.approx(0.9 * 1.0)


def test_spo_nan_rewards_do_not_touch_the_tracker():
    tracker = PromptStatTracker()
    res = compute_advantages("spo", t(1, NAN), ids(0, 1), tracker=tracker, prompt_keys=["a", "b"])
    assert res.valid.tolist() == [True, False] and "b" not in tracker
    with pytest.raises(ValueError, match="ema"):
        compute_advantages("spo", t(2.0), ids(0), tracker=tracker, prompt_keys=["a"])


# --- BNPO ----------------------------------------------------------------------------------------


def beta_pdf(p, a, b):
    return math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) * p ** (a - 1) * (1 - p) ** (b - 1)


def test_bnpo_fixed_normalisers_reduce_to_reinforce_and_grpo_like():
    r, g, keys = t(1, 0, 0, 1), ids(0, 0, 0, 0), ["a"] * 4
    # decay 0: p = posterior mean of Beta(1 + 2, 1 + 2) = 0.5
    reinforce = compute_advantages("bnpo", r, g, tracker=PromptStatTracker(), prompt_keys=keys,
                                   decay=0.0, beta_params=(1.0, 1.0))
    close(reinforce.advantages, [0.5, -0.5, -0.5, 0.5])
    # Beta(1.5, 1.5) density at 0.5 = sqrt(.25) / B(1.5, 1.5) = 0.5 / (pi / 8) = 4 / pi
    grpo_like = compute_advantages("bnpo", r, g, tracker=PromptStatTracker(), prompt_keys=keys,
                                   decay=0.0, beta_params=(1.5, 1.5))
    close(grpo_like.advantages, [v * math.pi / 4 for v in (0.5, -0.5, -0.5, 0.5)], atol=1e-12)


def test_bnpo_beta_params_method_of_moments():
    assert bnpo_beta_params(t(0.3)) == (1.0, 1.0)
    assert bnpo_beta_params(t(0.4, 0.4)) == (1.0, 1.0)
    # rates .05 .1 .15: m = .1, unbiased var .0025, c = .09/.0025 - 1 = 35 -> a = 3.5, b = 31.5
    a, b = bnpo_beta_params(t(0.05, 0.1, 0.15))
    assert a == pytest.approx(1 + 3.5 / 3) and b == pytest.approx(1 + 31.5 / 3)


def bnpo_expected(rewards, rates_by_sample, rates):
    m = sum(rates) / len(rates)
    v = sum((x - m) ** 2 for x in rates) / (len(rates) - 1)
    c = m * (1 - m) / v - 1
    a, b = 1 + c * m / 3, 1 + c * (1 - m) / 3
    return [(r - p) / beta_pdf(p, a, b) if not math.isnan(r) else 0.0 for r, p in zip(rewards, rates_by_sample)]


def test_bnpo_tracker_two_calls_and_restore():
    tracker = PromptStatTracker()
    keys = ["a"] * 4 + ["b"] * 4
    g = ids(0, 0, 0, 0, 1, 1, 1, 1)
    r1 = [1, 0, 0, 1, 1, 1, 1, NAN]
    first = compute_advantages("bnpo", t(*r1), g, tracker=tracker, prompt_keys=keys, decay=0.5)
    # a: Beta(1+2, 1+2) -> p .5; b: Beta(1+3, 1+0) -> p .8
    close(first.advantages, bnpo_expected(r1, [0.5] * 4 + [0.8] * 4, [0.5, 0.8]), atol=1e-12)
    assert first.valid.tolist() == [True] * 7 + [False]
    saved = json.loads(json.dumps(tracker.state_dict()))

    r2 = [1, 1, 1, 1, 0, 0, 0, 1]
    second = compute_advantages("bnpo", t(*r2), g, tracker=tracker, prompt_keys=keys, decay=0.5)
    # a: s = .5*2 + 4 = 5, f = .5*2 = 1 -> p 6/8; b: s = .5*3 + 1, f = 3 -> p 3.5/7.5
    pa, pb = 6 / 8, 3.5 / 7.5
    close(second.advantages, bnpo_expected(r2, [pa] * 4 + [pb] * 4, [pa, pb]), atol=1e-12)

    restored = PromptStatTracker()
    restored.load_state_dict(saved)
    again = compute_advantages("bnpo", t(*r2), g, tracker=restored, prompt_keys=keys, decay=0.5)
    assert torch.equal(again.advantages, second.advantages)
    assert restored.state_dict() == tracker.state_dict()


def test_bnpo_input_errors():
    tr = PromptStatTracker()
    with pytest.raises(ValueError, match="r_min"):
        compute_advantages("bnpo", t(0.0, 2.0), ids(0, 0), tracker=tr, prompt_keys=["a", "a"])
    with pytest.raises(ValueError, match="one prompt key per sample"):
        compute_advantages("bnpo", t(0.0, 1.0), ids(0, 0), tracker=tr, prompt_keys=["a"])
    # rewards on another scale are rescaled by r_min/r_max
    res = compute_advantages("bnpo", t(0.0, 10.0), ids(0, 0), tracker=tr, prompt_keys=["c", "c"],
                             r_max=10.0, beta_params=(1.0, 1.0))
    close(res.advantages, [-0.5, 0.5])


# --- gather across processes ------------------------------------------------------------------


def simulated_all_gather(per_rank, rank):
    """all_gather over ranks simulated in one process: per_rank[r] is rank r's dict of local
    tensors; gathering one of this rank's tensors concatenates the same entry of every rank."""

    def gather(x):
        name = next(k for k, v in per_rank[rank].items() if v is x)
        return torch.cat([local[name] for local in per_rank])

    return gather


def test_gather_computes_group_stats_across_ranks():
    per_rank = [
        {"rewards": t(1, 2, 3), "group_ids": ids(0, 0, 1), "strata": ids(0, 1, 0)},
        {"rewards": t(4, 5, 6), "group_ids": ids(1, 2, 2), "strata": ids(1, 0, 1)},
    ]
    global_res = compute_advantages("grpo", t(1, 2, 3, 4, 5, 6), ids(0, 0, 1, 1, 2, 2), eps=0.0)
    close(global_res.advantages, [-1, 1, -1, 1, -1, 1])
    for rank, sl in ((0, slice(0, 3)), (1, slice(3, 6))):
        local = per_rank[rank]
        res = compute_advantages("grpo", local["rewards"], local["group_ids"], eps=0.0,
                                 gather=simulated_all_gather(per_rank, rank), local_slice=sl)
        assert torch.equal(res.advantages, global_res.advantages[sl])
        assert res.stats == global_res.stats
        strat = compute_advantages("stratified", local["rewards"], local["group_ids"], strata=local["strata"],
                                   alpha=1.0, gather=simulated_all_gather(per_rank, rank), local_slice=sl)
        full = compute_advantages("stratified", t(1, 2, 3, 4, 5, 6), ids(0, 0, 1, 1, 2, 2),
                                  strata=ids(0, 1, 0, 1, 0, 1), alpha=1.0)
        assert torch.equal(strat.advantages, full.advantages[sl])
    # without gathering, group 1 is split over the ranks and loses its signal
    alone = compute_advantages("grpo", per_rank[0]["rewards"], per_rank[0]["group_ids"], eps=0.0)
    assert alone.advantages[2] == 0


# --- dtype and bad input -----------------------------------------------------------------------


def test_output_dtype_follows_rewards():
    res = compute_advantages("grpo", torch.tensor([0.0, 1.0]), ids(0, 0))
    assert res.advantages.dtype == torch.float32 and res.valid.dtype == torch.bool
    res = compute_advantages("grpo", torch.tensor([0, 1]), ids(0, 0))
    assert res.advantages.dtype == torch.get_default_dtype()


def test_bad_input_errors():
    r, g = t(0, 1), ids(0, 0)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", r, g)
    with pytest.raises(ValueError, match="zero_std"):
        compute_advantages("grpo", r, g, zero_std="skip")
    with pytest.raises(ValueError, match="adv_clip"):
        compute_advantages("grpo", r, g, adv_clip=0.0)
    with pytest.raises(ValueError, match="group_ids must have shape"):
        compute_advantages("grpo", r, ids(0, 0, 0))
    with pytest.raises(TypeError, match="integer"):
        compute_advantages("grpo", r, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="inf"):
        compute_advantages("grpo", t(0, float("inf")), g)
    with pytest.raises(ValueError, match="together"):
        compute_advantages("grpo", r, g, gather=lambda x: x)
    with pytest.raises(ValueError, match="scale"):
        compute_advantages("grpo", r, g, scale="mad")
    with pytest.raises(ValueError, match=r"\[B\] or \[B, K\]"):
        compute_advantages("grpo", torch.zeros(2, 2, 2), g)
