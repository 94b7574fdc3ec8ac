"""Tests for atskv.analysis.stats: exact bootstrap distributions against hand-computed ones, and the
properties (pairing, stratification, geomean aggregate) a wrong implementation would miss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atskv.analysis import stats


def _s(task: str, scores, prefix: str = "", parts=None) -> list[dict]:
    out = []
    for i, v in enumerate(scores):
        out.append({"id": f"{prefix}{task}/{i}", "task": task, "score": float(v),
                    "score_parts": parts[i] if parts else {}})
    return out


def _dist(samples, agg=None, **kw) -> dict[float, float]:
    vals, p = stats.bootstrap_distribution([stats.Term(1.0, samples, agg)], **kw)
    out: dict[float, float] = {}
    for v, w in zip(np.round(vals, 9), p, strict=True):
        out[float(v)] = out.get(float(v), 0.0) + float(w)
    return out


def test_exact_distribution_hand_computed():
    # three samples 0, 0, 100: the number k of draws of the 100 is Binomial(3, 1/3)
    s = _s("a", [0, 0, 100])
    d = _dist(s)
    want = {0.0: 8 / 27, round(100 / 3, 9): 12 / 27, round(200 / 3, 9): 6 / 27, 100.0: 1 / 27}
    assert d.keys() == want.keys()
    for k, p in want.items():
        assert d[k] == pytest.approx(p)
    # 90%: the 5% quantile is 0 (P(0) = 0.30); the 95% one is 66.7 (CDF 20/27 = 0.74 below
    # it, 26/27 = 0.96 at it)
    ci = stats.bootstrap_ci(s, level=0.9)
    assert ci.exact and ci.n == 3 and ci.n_resamples == 0
    assert ci.estimate == pytest.approx(100 / 3)
    assert (ci.low, ci.high) == (0.0, pytest.approx(200 / 3))
    # 95%: the 97.5% quantile needs the 100 (CDF 26/27 = 0.963 < 0.975)
    assert (stats.bootstrap_ci(s).low, stats.bootstrap_ci(s).high) == (0.0, 100.0)
    # two samples 0, 100, 50% interval: quantiles 0.25 and 0.75 of {0: 1/4, 50: 1/2, 100: 1/4}
    ci = stats.bootstrap_ci(_s("a", [0, 100]), level=0.5)
    assert (ci.low, ci.high) == (0.0, 50.0)


def test_monte_carlo_matches_exact_and_is_deterministic():
    s = _s("a", [0, 10, 20, 30, 40, 50, 60, 100])
    exact = stats.bootstrap_ci(s)
    assert exact.exact  # C(15, 8) = 6435 combinations: enumerated
    mc = stats.bootstrap_ci(s, exact=False, n_resamples=40_000, seed=1)
    assert not mc.exact and mc.n_resamples == 40_000
    assert mc.estimate == exact.estimate == pytest.approx(38.75)
    assert abs(mc.low - exact.low) <= 2.5 and abs(mc.high - exact.high) <= 2.5
    a = stats.bootstrap_ci(s, exact=False, n_resamples=500, seed=3)
    assert a == stats.bootstrap_ci(s, exact=False, n_resamples=500, seed=3)
    assert a != stats.bootstrap_ci(s, exact=False, n_resamples=500, seed=4)
    # the default is 2000 resamples when the distribution is too large to enumerate
    big = _s("a", range(40))
    assert stats.bootstrap_ci(big).n_resamples == 2000
    assert stats.bootstrap_ci(big, n_resamples=300).n_resamples == 300


def test_full_vs_itself_is_exactly_zero():
    run = _s("qa", [10, 55, 90, 0, 100, 37]) + _s("summ", [20, 80, 45, 60, 5])
    for kw in ({}, {"exact": False}):
        d = stats.paired_bootstrap_diff(run, run, **kw)
        assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
        assert d.contains_zero() and d.dropped == 0 and d.n == 11


def test_paired_applies_the_same_resample_to_both_runs():
    full = _s("qa", [0, 20, 40, 60, 80, 100]) + _s("summ", [10, 90, 50])
    better = [{**x, "score": x["score"] + 10} for x in full]
    d = stats.paired_bootstrap_diff(better, full, exact=False)
    # every sample is 10 better: each paired resample differs by exactly 10
    assert d.estimate == pytest.approx(10.0)
    assert d.low == pytest.approx(10.0) and d.high == pytest.approx(10.0)
    assert not d.contains_zero()
    # unpaired, the two accuracies' intervals are each dozens of points wide
    assert stats.bootstrap_ci(full).high - stats.bootstrap_ci(full).low > 30


def test_paired_joins_by_id_and_drops_unmatched():
    full = _s("qa", [0, 100, 50, 50])
    method = [{**x, "score": 100.0 - x["score"]} for x in full[1:]]  # qa/0 missing
    method.append({"id": "qa/extra", "task": "qa", "score": 100.0})
    method.reverse()  # order does not matter: joined by id
    d = stats.paired_bootstrap_diff(method, full)
    assert d.n == 3 and d.dropped == 2
    # over qa/1..3: method 0, 50, 50 (mean 33.3) vs full 100, 50, 50 (66.7)
    assert d.estimate == pytest.approx(-100 / 3)
    # exact: the difference is -100/3 x (draws of qa/1), Binomial(3, 1/3): -100 with P 1/27
    assert d.exact and d.low == pytest.approx(-100.0) and d.high == 0.0
    assert d.contains_zero()
    with pytest.raises(ValueError, match="share no sample id"):
        stats.paired_bootstrap_diff(_s("qa", [1], prefix="x"), _s("qa", [1], prefix="y"))
    with pytest.raises(ValueError, match="occurs twice"):
        stats.paired_bootstrap_diff(full + full[:1], full)


def test_stratification_by_task_matters():
    # task a always scores 0, task b always 100: within-task resamples never change the
    # mean over tasks (50); pooled resamples sometimes draw only a's samples (P = 2^4/4^4 =
    # 1/16 > 2.5%), whose mean over the tasks present is 0, and only b's (100)
    s = _s("a", [0, 0]) + _s("b", [100, 100])
    strat = stats.bootstrap_ci(s)
    assert (strat.estimate, strat.low, strat.high) == (50.0, 50.0, 50.0)
    pooled = stats.bootstrap_ci(s, stratify=False)
    assert pooled.exact and pooled.estimate == 50.0
    assert (pooled.low, pooled.high) == (0.0, 100.0)
    assert stats.bootstrap_ci(s, stratify=False, exact=False).low == 0.0


def test_accuracy_is_mean_over_tasks():
    s = _s("a", [100]) + _s("b", [0, 0, 0])
    assert stats.accuracy(s) == 50.0  # not the pooled 25
    ci = stats.bootstrap_ci(s)
    assert (ci.estimate, ci.low, ci.high) == (50.0, 50.0, 50.0)


def test_geomean_of_part_means():
    p1 = {"rouge1": 80.0, "rouge2": 20.0, "rougeL": 40.0}  # 0-100, as the benchmark writes them
    p2 = {"rouge1": 40.0, "rouge2": 0.0, "rougeL": 20.0}
    p3 = {"rouge1": 60.0, "rouge2": 40.0, "rougeL": 50.0}
    agg = {"gov_report": stats.GEOMEAN}

    def gm(*ps):
        means = [sum(p[k] for p in ps) / len(ps) for k in ("rouge1", "rouge2", "rougeL")]
        return math.prod(means) ** (1 / 3)

    # per-sample scores that a plain mean would use (the per-sample geometric means)
    s = _s("gov_report", [gm(p1), gm(p2)], parts=[p1, p2])
    assert stats.accuracy(s, agg) == pytest.approx(gm(p1, p2))  # (60*10*30)^(1/3)
    assert gm(p1, p2) == pytest.approx(18000 ** (1 / 3))
    # the same number as the benchmark's own aggregate of those rows (result.json's score)
    from atskv.benchmarks.base import aggregate_rows

    assert stats.accuracy(s, agg) == pytest.approx(aggregate_rows(stats.GEOMEAN, s))
    assert stats.accuracy(s) == pytest.approx((gm(p1) + gm(p2)) / 2)  # "mean" differs
    assert stats.accuracy(s, agg) != pytest.approx(stats.accuracy(s))
    # exact distribution over two samples: {p1,p1}, {p2,p2} with 1/4 each, mixed with 1/2
    d = _dist(s, agg)
    want = {round(gm(p1), 9): 0.25, round(gm(p2), 9): 0.25, round(gm(p1, p2), 9): 0.5}
    assert d.keys() == want.keys() and gm(p2) == 0.0  # rouge2 = 0: its geometric mean is 0
    assert [d[k] for k in want] == pytest.approx(list(want.values()))
    # together with a mean task: the mean over tasks of the two aggregates
    both = s + _s("qa", [30, 50], parts=None)
    agg2 = {**agg, "qa": stats.MEAN}
    assert stats.accuracy(both, agg2) == pytest.approx((gm(p1, p2) + 40) / 2)
    ci = stats.bootstrap_ci(both + _s("gov_report", [0], prefix="x", parts=[p3]), agg2)
    assert ci.low <= ci.estimate <= ci.high
    with pytest.raises(ValueError, match="score_parts"):
        stats.bootstrap_ci(_s("gov_report", [1, 2]), agg)


def test_weighted_terms_combine_independent_runs():
    a, b = _s("t", [0, 100]), _s("t", [50, 50], prefix="b")
    ci = stats.weighted_bootstrap([stats.Term(0.5, a), stats.Term(0.5, b)], level=0.5)
    # a's accuracy is 0/50/100 with 1/4, 1/2, 1/4; b's is always 50: half of each
    assert ci.estimate == 50.0 and (ci.low, ci.high) == (25.0, 50.0)
    assert ci.n == 4
    with pytest.raises(ValueError, match="unknown aggregation"):
        stats.bootstrap_ci(a, {"t": "median"})


# ----------------------------------------------------------------------------- tests, AUC
def test_holm_hand_checked():
    """m = 4 tested p-values (the NaN is not tested and not counted), alpha = 0.05.

    Ascending: 0.005 (#4), 0.01 (#0), 0.03 (#3), 0.04 (#2).
    Step-down thresholds alpha / (m - i + 1): 0.0125, 0.0167, 0.025, 0.05.
    0.005 <= 0.0125 reject; 0.01 <= 0.0167 reject; 0.03 > 0.025 stop: #3 and #2 are kept,
    although each is below 0.05 on its own (uncorrected, all four would be "significant").
    Adjusted p: #4 4 x 0.005 = 0.02; #0 max(0.02, 3 x 0.01) = 0.03; #3 max(0.03, 2 x 0.03) =
    0.06; #2 max(0.06, 1 x 0.04) = 0.06.
    """
    adj, rej = stats.holm([0.01, float("nan"), 0.04, 0.03, 0.005])
    assert rej == [True, False, False, False, True]
    assert adj[0] == pytest.approx(0.03) and adj[2] == pytest.approx(0.06)
    assert adj[3] == pytest.approx(0.06) and adj[4] == pytest.approx(0.02)
    assert math.isnan(adj[1])
    assert stats.holm([]) == ([], [])
    assert stats.holm([0.2, 0.9]) == ([0.4, 0.9], [False, False])  # capped at 1, monotone


def test_fewer_than_ten_samples_are_not_tested():
    assert not stats.testable(3) and not stats.testable(9) and not stats.testable(float("nan"))
    assert stats.testable(10) and stats.testable(32)


def _pair(a_scores, b_scores, task="t"):
    return stats.Term(1.0, _s(task, a_scores), None, _s(task, b_scores))


def test_permutation_p_hand_computed():
    # three samples, all worse by 100: only "no swap" and "swap all" are as extreme: 2/8
    assert stats.permutation_p([_pair([0, 0, 0], [100, 100, 100])]) == 0.25
    # differences -10, -20, +5 (mean -25/3): of the 8 sign patterns the sums -25, 25, -35, 35
    # are at least as far from 0 as -25: p = 4/8
    assert stats.permutation_p([_pair([0, 0, 10], [10, 20, 5])]) == 0.5
    assert stats.permutation_p([_pair([7, 8], [7, 8])]) == 1.0  # no difference at all
    # geomean task: swapping one sample gives |T| = 5 < 15 (hand-computed), both-or-none 15
    parts_a = [{"r1": 80, "r2": 20, "rl": 40}, {"r1": 40, "r2": 10, "rl": 20}]
    parts_b = [{"r1": 40, "r2": 10, "rl": 20}, {"r1": 20, "r2": 5, "rl": 10}]
    gm = {"t": stats.GEOMEAN}
    t = stats.Term(1.0, _s("t", [0, 0], parts=parts_a), gm, _s("t", [0, 0], parts=parts_b))
    assert stats.weighted_bootstrap([t], exact=True).estimate == pytest.approx(15.0)
    assert stats.permutation_p([t]) == 0.5
    # 20 samples all worse: random sign flips (seeded); only the observed pattern is as extreme
    big = [_pair([0] * 20, [100] * 20)]
    p = stats.permutation_p(big, n_permutations=5000, seed=1)
    assert p == pytest.approx(1 / 5001) and p == stats.permutation_p(big, n_permutations=5000,
                                                                      seed=1)
    with pytest.raises(ValueError, match="paired"):
        stats.permutation_p([stats.Term(1.0, _s("t", [1]))])


def test_trapezoid_weights_hand_computed():
    """Budgets 0.1, 0.2, 0.5 and accuracies 10, 30, 40: area 0.1 x (10 + 30) / 2 + 0.3 x
    (30 + 40) / 2 = 2 + 10.5 = 12.5 over a range of 0.4: a mean accuracy of 31.25. Weights:
    0.05 / 0.4, (0.05 + 0.15) / 0.4, 0.15 / 0.4."""
    w = stats.trapezoid_weights([0.1, 0.2, 0.5])
    assert w.tolist() == pytest.approx([0.125, 0.5, 0.375])
    assert float(np.dot(w, [10, 30, 40])) == pytest.approx(31.25)
    assert stats.trapezoid_weights([0.1, 0.3]).tolist() == pytest.approx([0.5, 0.5])
    for bad in ([0.1], [0.2, 0.1], [0.1, 0.1]):
        with pytest.raises(ValueError, match="two increasing"):
            stats.trapezoid_weights(bad)


def test_joint_resampling_draws_the_same_ids_for_every_run():
    """The same run at two budgets (identical scores per id), weights 1/2 each: resampled
    jointly, the statistic is always the run's own accuracy, so its distribution is the
    run's; resampled independently it would be narrower (two independent means averaged)."""
    s = _s("a", [0, 0, 100])
    joint = stats.weighted_bootstrap([stats.Joint(1.0, [(0.5, s, None), (0.5, s, None)])])
    alone = stats.bootstrap_ci(s)
    assert (joint.low, joint.high, joint.estimate) == (alone.low, alone.high, alone.estimate)
    indep = stats.weighted_bootstrap([stats.Term(0.5, s), stats.Term(0.5, s)])
    assert indep.high < joint.high
    # ids in one run only are left out and counted
    other = _s("a", [100, 100, 100, 0])  # a/3 only here
    j = stats.weighted_bootstrap([stats.Joint(1.0, [(0.5, s, None), (0.5, other, None)])])
    assert j.n == 3 and j.dropped == 1 and j.estimate == pytest.approx((100 / 3 + 100) / 2)
