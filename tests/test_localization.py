"""Tests for ground-truth localization scores (vitxai.metrics.localization)."""

from itertools import combinations

import numpy as np
import pytest

from vitxai.metrics.localization import (
    class_discrimination,
    mass_inside,
    pointing_game,
    rank_accuracy,
)


def _mask(pixels, shape=(4, 4)):
    m = np.zeros(shape, dtype=bool)
    m.flat[list(pixels)] = True
    return m


def _brute_rank_accuracy(a, t):
    """Mean over every way of breaking ties at the cut: all subsets of the tied pixels."""
    flat, inside = a.ravel(), t.ravel()
    k = int(inside.sum())
    kth = np.sort(flat)[::-1][k - 1]
    above = np.flatnonzero(flat > kth)
    at = np.flatnonzero(flat == kth)
    hits = [inside[above].sum() + inside[list(c)].sum() for c in combinations(at, k - len(above))]
    return np.mean(hits) / k


T = _mask([0, 1, 4, 5])  # 2×2 object in the top-left corner of a 4×4 image
PERFECT = np.where(T, 1.0, 0.0) + np.arange(16).reshape(4, 4) * 1e-3  # no ties


def test_rank_accuracy_perfect_inverted_and_partial():
    assert rank_accuracy(PERFECT, T) == 1.0
    assert rank_accuracy(-PERFECT, T) == 0.0
    partial = np.zeros((4, 4))
    partial.flat[[0, 1, 2, 3]] = [4, 3, 2, 1]  # top-4 pixels: two inside T
    partial.flat[4:] = -np.arange(1, 13)
    assert rank_accuracy(partial, T) == 0.5
    assert rank_accuracy(PERFECT, np.ones((4, 4), bool)) == 1.0


def test_rank_accuracy_ties_give_the_exact_expectation():
    # top-2 of [[3, 1, 1], [1, 0, 0]] with T = {(0,0), (0,1)}: 3 is in; one of the three
    # 1s is drawn, and it lies in T with probability 1/3
    a = np.array([[3.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    t = np.array([[True, True, False], [False, False, False]])
    assert rank_accuracy(a, t) == pytest.approx((1 + 1 / 3) / 2)
    assert rank_accuracy(np.full((4, 4), 0.3), T) == pytest.approx(4 / 16)  # constant: K/HW
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.integers(0, 3, size=(3, 4)).astype(float)
        t = rng.random((3, 4)) < 0.4
        if t.any():
            assert rank_accuracy(a, t) == pytest.approx(_brute_rank_accuracy(a, t))


def test_rank_accuracy_edge_cases():
    assert np.isnan(rank_accuracy(PERFECT, np.zeros((4, 4), bool)))
    with pytest.raises(ValueError, match="NaN"):
        rank_accuracy(np.full((4, 4), np.nan), T)
    with pytest.raises(ValueError, match="shapes"):
        rank_accuracy(PERFECT, T[:3])


def test_class_discrimination():
    a_mask, b_mask = T, _mask([10, 11, 14, 15])
    on_a = np.where(a_mask, 2.0, 0.0) - 5.0 * b_mask  # negative relevance is ignored
    assert class_discrimination(on_a, a_mask, b_mask) == 1.0
    assert class_discrimination(np.where(b_mask, 1.0, 0.0), a_mask, b_mask) == -1.0
    split = np.zeros((4, 4))
    split.flat[[0, 10, 7]] = [3.0, 1.0, 4.0]  # 3/8 on A, 1/8 on B, 4/8 on background
    assert class_discrimination(split, a_mask, b_mask) == pytest.approx(0.25)
    assert class_discrimination(split, a_mask, a_mask) == 0.0  # overlap cancels
    assert class_discrimination(split, a_mask, b_mask) == pytest.approx(
        mass_inside(split, a_mask) - mass_inside(split, b_mask)
    )


def test_class_discrimination_undefined():
    assert np.isnan(class_discrimination(-PERFECT, T, ~T))  # no positive mass
    assert np.isnan(class_discrimination(PERFECT, T, np.zeros((4, 4), bool)))
    assert np.isnan(class_discrimination(PERFECT, np.zeros((4, 4), bool), T))
    with pytest.raises(ValueError, match="NaN"):
        class_discrimination(np.full((4, 4), np.inf), T, ~T)


def test_existing_scores_unchanged():
    assert pointing_game(PERFECT, T) == 1.0
    assert mass_inside(np.where(T, 1.0, 0.0), T) == 1.0
    assert np.isnan(mass_inside(-PERFECT, T))
