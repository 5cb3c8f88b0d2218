"""Tests for bootstrap intervals, paired tests and rankings (vitxai.stats)."""

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from vitxai.stats import PairedTest, adjust_pvalues, bootstrap_ci, paired_tests, ranking

NAN = float("nan")


def test_bootstrap_degenerate_inputs():
    assert all(np.isnan(bootstrap_ci([])))
    assert all(np.isnan(bootstrap_ci([NAN, np.inf])))
    assert bootstrap_ci([NAN, 0.7]) == (0.7, 0.7, 0.7)
    assert bootstrap_ci([2.0, 2.0, 2.0], method="bca") == (2.0, 2.0, 2.0)


def test_bootstrap_ignores_nan_and_is_reproducible():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    with_nan = np.concatenate([x[:10], [NAN, -np.inf], x[10:]])
    for method in ("percentile", "bca"):
        mean, low, high = bootstrap_ci(x, method=method)
        assert mean == pytest.approx(x.mean())
        assert low < mean < high
        assert bootstrap_ci(with_nan, method=method) == (mean, low, high)
        assert bootstrap_ci(x, method=method, seed=1) != (mean, low, high)
    narrow = bootstrap_ci(x, confidence=0.5)
    assert narrow[1] > bootstrap_ci(x)[1] and narrow[2] < bootstrap_ci(x)[2]


def test_bootstrap_close_to_scipy():
    # a skewed sample, where BCa and percentile intervals differ visibly
    x = np.random.default_rng(1).exponential(size=30)
    for ours, theirs in (("percentile", "percentile"), ("bca", "BCa")):
        _, low, high = bootstrap_ci(x, method=ours, n_resamples=20000)
        ci = bootstrap((x,), np.mean, method=theirs, n_resamples=20000, rng=0).confidence_interval
        assert low == pytest.approx(ci.low, abs=0.02)
        assert high == pytest.approx(ci.high, abs=0.02)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_coverage(method):
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        _, low, high = bootstrap_ci(rng.normal(1.0, 2.0, size=50), seed=trial, method=method,
                                    n_resamples=1000)
        hits += low <= 1.0 <= high
    assert 0.9 <= hits / 200 <= 0.99


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=20), rng.normal(0.5, 1.0, size=20)
    (row,) = paired_tests({"x": x, "y": y})
    ref = wilcoxon(x, y)
    assert (row.a, row.b, row.n_pairs) == ("x", "y", 20)
    assert row.statistic == ref.statistic
    assert row.p_value == pytest.approx(ref.pvalue)
    assert row.p_adjusted == row.p_value  # a family of one test
    assert row.mean_diff == pytest.approx(np.mean(x - y))
    (flipped,) = paired_tests({"x": x, "y": y}, higher_is_better=False)
    assert flipped.mean_diff == pytest.approx(-row.mean_diff)
    assert flipped.p_value == row.p_value
    # 6 positive differences: exact two-sided p = 2 / 2**6
    (row,) = paired_tests({"a": np.arange(1.0, 7.0), "b": np.zeros(6)})
    assert (row.statistic, row.p_value, row.significant) == (0.0, 0.03125, True)


def test_untestable_pairs_get_p_one():
    base = np.arange(10.0)
    nan_tail = np.where(np.arange(10) < 5, base + 1, NAN)  # only 5 finite pairs
    rows = paired_tests({"a": base, "same": base.copy(), "short": nan_tail})
    by_pair = {(r.a, r.b): r for r in rows}
    same = by_pair["a", "same"]
    assert (same.n_pairs, same.mean_diff, same.p_value, same.significant) == (10, 0.0, 1.0, False)
    assert np.isnan(same.statistic)
    short = by_pair["a", "short"]
    assert (short.n_pairs, short.p_value) == (5, 1.0)
    assert short.mean_diff == -1.0
    with pytest.raises(ValueError, match="same length"):
        paired_tests({"a": base, "b": base[:5]})


def test_adjust_pvalues_by_hand():
    p = [0.01, 0.04, 0.03]
    # Holm: sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), [0.03, 0.12, 0.09])
    np.testing.assert_allclose(adjust_pvalues(p, "none"), p)
    np.testing.assert_allclose(adjust_pvalues([0.5, 0.2, 0.001, 0.9], "holm"),
                               [1.0, 0.6, 0.004, 1.0])
    with pytest.raises(ValueError, match="holm"):
        adjust_pvalues(p, "fdr")


def test_paired_tests_holm_by_hand():
    rng = np.random.default_rng(4)
    scores = {"a": rng.normal(0.3, 1, 25), "b": rng.normal(0, 1, 25), "c": rng.normal(0, 1, 25)}
    rows = paired_tests(scores, alpha=0.05)
    assert [(r.a, r.b) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    raw = [wilcoxon(scores[r.a], scores[r.b]).pvalue for r in rows]
    order = np.argsort(raw)
    holm = np.empty(3)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (3 - i) * raw[j]))
        holm[j] = running
    np.testing.assert_allclose([r.p_value for r in rows], raw)
    np.testing.assert_allclose([r.p_adjusted for r in rows], holm)
    assert [r.significant for r in rows] == list(holm < 0.05)
    bonf = paired_tests(scores, correction="bonferroni")
    np.testing.assert_allclose([r.p_adjusted for r in bonf], np.minimum(1, 3 * np.array(raw)))
    assert isinstance(rows[0], PairedTest)


def test_ranking_ties_and_separation():
    rng = np.random.default_rng(5)
    good = rng.normal(0.8, 0.05, 40)
    scores = {
        "bad": good - 0.5 + rng.normal(0, 0.05, 40),
        "good": good,
        "twin": good.copy(),  # identical to 'good': every difference is 0
        "middle": good - 0.2 + rng.normal(0, 0.05, 40),
    }
    rows = ranking(scores, n_resamples=500)
    assert [(r.rank, r.method) for r in rows] == [(1, "good"), (1, "twin"), (3, "middle"),
                                                  (4, "bad")]
    assert rows[0].tied_with == ["twin"] and rows[1].tied_with == ["good"]
    assert rows[2].tied_with == [] and rows[3].tied_with == []
    assert rows[0].ci_low <= rows[0].mean <= rows[0].ci_high
    assert rows[0].mean == pytest.approx(good.mean())
    # lower is better: the order reverses, the groups stay
    rows = ranking(scores, higher_is_better=False, n_resamples=500)
    assert [(r.rank, r.method) for r in rows] == [(1, "bad"), (2, "middle"), (3, "good"),
                                                  (3, "twin")]


def test_ranking_undefined_and_indistinguishable_methods():
    rng = np.random.default_rng(6)
    noise = {name: rng.normal(0, 1, 30) for name in ("a", "b", "c")}
    rows = ranking({**noise, "empty": np.full(30, NAN)}, n_resamples=200)
    assert [r.rank for r in rows] == [1, 1, 1, None]  # pure noise: one tie group
    assert sorted(rows[0].tied_with) == sorted(r.method for r in rows[1:3])
    assert rows[3].method == "empty" and np.isnan(rows[3].mean) and rows[3].tied_with == []
