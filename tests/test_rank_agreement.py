"""Tests for the Krishna et al. agreement metrics (vitxai.metrics.rank_agreement)."""

from functools import partial
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, spearmanr

from vitxai.metrics.rank_agreement import (
    agreement_table,
    feature_agreement,
    pairwise_rank_agreement,
    rank_agreement,
    rank_correlation,
    sign_agreement,
    signed_rank_agreement,
    tie_fraction,
    topk_indices,
)

TOPK = {
    "FA": feature_agreement,
    "RA": rank_agreement,
    "SA": sign_agreement,
    "SRA": signed_rank_agreement,
}

# |E_a| order: 0 (5), 1 (4), 2 (3), 5 (2), 3 (.5), 4 (.1)
E_A = np.array([5.0, -4.0, 3.0, 0.5, -0.1, 2.0])
# |E_b| order: 0 (6), 2 (5), 3 (4), 1 (1), 5 (.5), 4 (0)
E_B = np.array([-6.0, 1.0, 5.0, 4.0, 0.0, -0.5])


def _brute_rc(a, b, features):
    """Spearman by definition: average ranks counted pair by pair, then Pearson."""
    x, y = np.abs(a[features]), np.abs(b[features])

    def ranks(v):
        return np.array([1 + (v < t).sum() + 0.5 * ((v == t).sum() - 1) for t in v])

    ra, rb = ranks(x) - ranks(x).mean(), ranks(y) - ranks(y).mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return (ra * rb).sum() / den if den > 0 else np.nan


def _brute_pra(a, b, features, ties):
    x, y = np.abs(a), np.abs(b)
    pairs = list(combinations(sorted(features), 2))
    if ties == "strict":
        agree = [np.sign(x[i] - x[j]) == np.sign(y[i] - y[j]) for i, j in pairs]
    else:  # the reference code: rank_A[f1] < rank_A[f2] == rank_B[f1] < rank_B[f2]
        agree = [(x[i] > x[j]) == (y[i] > y[j]) for i, j in pairs]
    return np.mean(agree) if pairs else np.nan


def _tied_maps(rng, n, d):
    """Small-integer maps: plenty of ties in |E|, zeros, and both signs."""
    return rng.integers(-3, 4, size=(n, d)).astype(float)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # S = {0, 2}; same position only for feature 0 (rank 1), whose signs differ;
        # feature 2 has the same sign in both
        (3, {"FA": 2 / 3, "RA": 1 / 3, "SA": 1 / 3, "SRA": 0.0}),
        # top_4(a) = [0, 1, 2, 5], top_4(b) = [0, 2, 3, 1]: S = {0, 1, 2}; only 2 agrees in sign
        (4, {"FA": 3 / 4, "RA": 1 / 4, "SA": 1 / 4, "SRA": 0.0}),
        (1, {"FA": 1.0, "RA": 1.0, "SA": 0.0, "SRA": 0.0}),
        # same position: features 0 and 4 (last), both with different signs
        (6, {"FA": 1.0, "RA": 2 / 6, "SA": 2 / 6, "SRA": 0.0}),
    ],
)
def test_topk_metrics_hand_computed(k, expected):
    for name, fn in TOPK.items():
        assert fn(E_A, E_B, k) == pytest.approx(expected[name]), name
        assert fn(E_B, E_A, k) == pytest.approx(expected[name]), name  # symmetric


def test_topk_indices_and_tie_breaking_by_index():
    np.testing.assert_array_equal(topk_indices(E_A, 3), [0, 1, 2])
    tied = np.array([1.0, -2.0, 2.0, -1.0, 2.0])
    np.testing.assert_array_equal(topk_indices(tied, 4), [1, 2, 4, 0])
    np.testing.assert_array_equal(topk_indices(np.stack([tied, -tied]), 2), [[1, 2], [1, 2]])
    # both maps constant: the same (index-ordered) top-k list, so full agreement
    flat = np.ones(5)
    assert rank_agreement(flat, 2 * flat, 3) == 1.0


def test_tie_fraction():
    assert tie_fraction(np.array([3.0, 2.0, -2.0, 1.0]), 1) == 0.0
    assert tie_fraction(np.array([3.0, 2.0, -2.0, 1.0]), 2) == 0.5  # 2 is tied with 3rd
    assert tie_fraction(np.array([3.0, 2.0, -2.0, 1.0]), 3) == pytest.approx(2 / 3)
    assert tie_fraction(np.array([3.0, 2.0, 1.0, -1.0]), 2) == 0.0  # tie below the cut
    assert tie_fraction(np.ones(4), 2) == 1.0
    np.testing.assert_allclose(
        tie_fraction(np.array([[3.0, 2.0, -2.0, 1.0], [1.0, 1.0, 2.0, 3.0]]), 2), [0.5, 0.0]
    )


def test_invariants_on_random_maps():
    rng = np.random.default_rng(0)
    for maps in (rng.normal(size=(2, 40, 30)), _tied_maps(rng, 2 * 40, 30).reshape(2, 40, 30)):
        a, b = maps
        for k in (1, 5, 15, 30):
            fa, ra, sa, sra = (TOPK[m](a, b, k) for m in ("FA", "RA", "SA", "SRA"))
            assert fa.shape == (40,)
            assert np.all((0 <= sra) & (sra <= ra) & (ra <= fa) & (fa <= 1))
            assert np.all((sra <= sa) & (sa <= fa))
            assert np.all(np.isclose(np.round(fa * k), fa * k))  # multiples of 1/k


def test_identical_maps_score_one_everywhere():
    rng = np.random.default_rng(1)
    for a in (rng.normal(size=(5, 20)), _tied_maps(rng, 5, 20) + 0.5):  # no zeros
        for name, fn in TOPK.items():
            np.testing.assert_array_equal(fn(a, a, 7), 1.0, err_msg=name)
        np.testing.assert_allclose(rank_correlation(a, a), 1.0)
        for ties in ("strict", "reference"):
            np.testing.assert_array_equal(pairwise_rank_agreement(a, a, ties=ties), 1.0)


def test_negated_map():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 25))
    for k in (1, 6, 25):
        np.testing.assert_array_equal(feature_agreement(a, -a, k), 1.0)
        np.testing.assert_array_equal(rank_agreement(a, -a, k), 1.0)
        np.testing.assert_array_equal(sign_agreement(a, -a, k), 0.0)
        np.testing.assert_array_equal(signed_rank_agreement(a, -a, k), 0.0)
    # magnitudes are unchanged, so the rank metrics see identical maps
    np.testing.assert_allclose(rank_correlation(a, -a), 1.0)
    np.testing.assert_array_equal(pairwise_rank_agreement(a, -a), 1.0)


def test_batch_equals_rows_and_torch_input():
    rng = np.random.default_rng(3)
    a, b = _tied_maps(rng, 6, 12), _tied_maps(rng, 6, 12)
    fns = [partial(fn, k=4) for fn in TOPK.values()] + [
        rank_correlation,
        lambda x, y: rank_correlation(x, y, "union_topk", 3),
        pairwise_rank_agreement,
        lambda x, y: pairwise_rank_agreement(x, y, "union_topk", 3, ties="reference"),
    ]
    for fn in fns:
        batch = fn(a, b)
        rows = [fn(a[i], b[i]) for i in range(6)]
        assert isinstance(rows[0], float)
        np.testing.assert_array_equal(batch, rows)
        np.testing.assert_array_equal(fn(torch.from_numpy(a).float(), torch.from_numpy(b)), batch)


def test_rank_correlation_matches_scipy_and_brute_force_with_ties():
    rng = np.random.default_rng(4)
    for d in (2, 3, 7, 16):
        a, b = _tied_maps(rng, 30, d), _tied_maps(rng, 30, d)
        rc = rank_correlation(a, b)
        for i in range(30):
            expected = _brute_rc(a[i], b[i], np.arange(d))
            np.testing.assert_allclose(rc[i], expected, atol=1e-12, equal_nan=True)
            if np.isfinite(expected):
                np.testing.assert_allclose(rc[i], spearmanr(np.abs(a[i]), np.abs(b[i]))[0],
                                           atol=1e-12)


def test_rank_correlation_feature_sets():
    rng = np.random.default_rng(5)
    a, b = _tied_maps(rng, 20, 15), rng.normal(size=(20, 15))
    fixed = np.array([9, 0, 4, 7, 2])
    per_row = np.stack([rng.permutation(15)[:6] for _ in range(20)])
    for features, k in ((fixed, None), (per_row, None), ("union_topk", 4)):
        rc = rank_correlation(a, b, features, k)
        for i in range(20):
            if k is not None:
                f = np.union1d(topk_indices(a[i], k), topk_indices(b[i], k))
            else:
                f = features if features.ndim == 1 else features[i]
            np.testing.assert_allclose(rc[i], _brute_rc(a[i], b[i], f), atol=1e-12,
                                       equal_nan=True)


@pytest.mark.parametrize("ties", ["strict", "reference"])
@pytest.mark.parametrize("algorithm", ["pairs", "kendall"])
def test_pra_matches_brute_force_with_ties(ties, algorithm):
    rng = np.random.default_rng(6)
    for d in (2, 3, 5, 11):
        a, b = _tied_maps(rng, 25, d), _tied_maps(rng, 25, d)
        b[:3] = a[:3]  # identical rows
        b[3] = 0.0  # a constant row
        per_row = np.stack([rng.permutation(d)[: max(2, d // 2)] for _ in range(25)])
        for features, k in (("all", None), ("union_topk", 2), (per_row, None)):
            pra = pairwise_rank_agreement(a, b, features, k, ties=ties, algorithm=algorithm)
            for i in range(25):
                if isinstance(features, np.ndarray):
                    f = features[i]
                elif features == "union_topk":
                    f = np.union1d(topk_indices(a[i], 2), topk_indices(b[i], 2))
                else:
                    f = np.arange(d)
                assert pra[i] == pytest.approx(_brute_pra(a[i], b[i], f, ties), abs=1e-12)


def test_pra_tie_rules_by_hand():
    x = np.array([1.0, -1.0])  # tied
    # y orders feature 1 above 0: the booleans 'x0 > x1' and 'y0 > y1' are both False
    assert pairwise_rank_agreement(x, np.array([1.0, 2.0]), ties="reference") == 1.0
    assert pairwise_rank_agreement(x, np.array([1.0, 2.0]), ties="strict") == 0.0
    # y orders feature 0 above 1: disagreement under both rules
    assert pairwise_rank_agreement(x, np.array([2.0, 1.0]), ties="reference") == 0.0
    assert pairwise_rank_agreement(x, np.array([2.0, 1.0]), ties="strict") == 0.0
    # tied in both: agreement under both rules
    assert pairwise_rank_agreement(x, np.array([3.0, 3.0]), ties="strict") == 1.0
    assert pairwise_rank_agreement(x, np.array([3.0, 3.0]), ties="reference") == 1.0
    # 3 pairs: (0,1) agrees, (0,2) agrees, (1,2) reversed
    assert pairwise_rank_agreement(np.array([3.0, 2.0, 1.0]),
                                   np.array([3.0, 1.0, 2.0])) == pytest.approx(2 / 3)


def test_pra_without_ties_is_kendall_and_large_d_path():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 300))
    b = a + rng.normal(size=(3, 300))
    pra = pairwise_rank_agreement(a, b)  # auto: d > 256 -> Kendall path
    for i in range(3):
        tau = kendalltau(np.abs(a[i]), np.abs(b[i])).statistic
        assert pra[i] == pytest.approx((1 + tau) / 2, abs=1e-12)
    qa, qb = np.round(a, 1), np.round(b, 1)  # many ties, both rules, both paths
    for ties in ("strict", "reference"):
        np.testing.assert_array_equal(
            pairwise_rank_agreement(qa, qb, ties=ties),
            pairwise_rank_agreement(qa, qb, ties=ties, algorithm="pairs"),
        )


def test_undefined_values_are_nan():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0])
    one = np.array([1])
    assert np.isnan(rank_correlation(a, b, one))
    assert np.isnan(pairwise_rank_agreement(a, b, one))
    assert np.isnan(rank_correlation(a, np.full(3, 2.0)))  # constant ranking: ρ undefined
    assert pairwise_rank_agreement(a, np.full(3, 2.0)) == 0.0  # tied only in b: strict
    assert pairwise_rank_agreement(np.zeros(3), np.zeros(3)) == 1.0


def test_agreement_table():
    rng = np.random.default_rng(8)
    maps = {
        "signed": torch.from_numpy(rng.normal(size=(4, 16))),
        "rollout": np.abs(rng.normal(size=(4, 16))) + 0.1,
        "cam": np.repeat(np.abs(rng.normal(size=(4, 4))) + 0.1, 4, axis=1),  # tied blocks
    }
    table = agreement_table(maps, 3, features="union_topk", ties="reference")
    assert set(table) == {(a, b) for a in maps for b in maps if a != b}
    row = table["signed", "rollout"]
    np.testing.assert_array_equal(row["feature_agreement"],
                                  feature_agreement(maps["signed"], maps["rollout"], 3))
    np.testing.assert_array_equal(row["rank_correlation"],
                                  rank_correlation(maps["signed"], maps["rollout"],
                                                   "union_topk", 3))
    np.testing.assert_array_equal(
        row["pairwise_rank_agreement"],
        pairwise_rank_agreement(maps["signed"], maps["rollout"], "union_topk", 3,
                                ties="reference"),
    )
    for value in row.values():
        assert value.shape == (4,)
    assert not row["nonnegative_pair"].any()
    flagged = table["rollout", "cam"]
    assert flagged["nonnegative_pair"].all()
    np.testing.assert_array_equal(flagged["sign_agreement"], flagged["feature_agreement"])
    # each 4-block of 'cam' is tied, so every top-3 feature is tied with another
    np.testing.assert_array_equal(flagged["tie_fraction_b"], 1.0)
    np.testing.assert_array_equal(table["cam", "rollout"]["tie_fraction_a"], 1.0)
    np.testing.assert_array_equal(table["cam", "rollout"]["rank_agreement"],
                                  flagged["rank_agreement"])


def test_invalid_inputs():
    a = np.arange(4.0)
    with pytest.raises(ValueError, match="k must"):
        feature_agreement(a, a, 0)
    with pytest.raises(ValueError, match="k must"):
        feature_agreement(a, a, 5)
    with pytest.raises(ValueError, match="same shape"):
        feature_agreement(a, a[None], 2)
    with pytest.raises(ValueError, match="NaN"):
        rank_correlation(np.array([1.0, np.nan]), a[:2])
    with pytest.raises(ValueError, match="needs k"):
        rank_correlation(a, a, "union_topk")
    with pytest.raises(ValueError, match="only used"):
        pairwise_rank_agreement(a, a, "all", 2)
    with pytest.raises(ValueError, match="distinct"):
        rank_correlation(a, a, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rank_correlation(a, a, np.array([0, 4]))
    with pytest.raises(ValueError, match="ties"):
        pairwise_rank_agreement(a, a, ties="dense")
