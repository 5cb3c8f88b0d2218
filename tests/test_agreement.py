"""Tests for mask-overlap agreement (vitxai.metrics.agreement)."""

import warnings

import numpy as np
import pytest
import torch

from vitxai.metrics import aggregate_matrices, mask_vs_truth, overlap_matrices

NAN = np.nan


def _mask(pixels, shape=(2, 4)):
    m = np.zeros(shape, dtype=bool)
    m.flat[list(pixels)] = True
    return m


# A = {0,1,2,3}, B = {2,3,4,5}, D = everything (8 px), C = E = empty.
A, B, D = _mask(range(4)), _mask(range(2, 6)), _mask(range(8))
C = E = _mask([])


def test_overlap_hand_computed():
    o = overlap_matrices(np.stack([A, B, D]))
    # |A∩B| = 2, |A∪B| = 6; |A∩D| = 4, |A∪D| = 8; |B∩D| = 4, |B∪D| = 8
    iou = [[1, 1 / 3, 1 / 2], [1 / 3, 1, 1 / 2], [1 / 2, 1 / 2, 1]]
    dice = [[1, 1 / 2, 2 / 3], [1 / 2, 1, 2 / 3], [2 / 3, 2 / 3, 1]]
    coverage = [[1, 1 / 2, 1], [1 / 2, 1, 1], [1 / 2, 1 / 2, 1]]
    np.testing.assert_allclose(o["iou"], iou, rtol=0, atol=1e-15)
    np.testing.assert_allclose(o["dice"], dice, rtol=0, atol=1e-15)
    np.testing.assert_allclose(o["coverage"], coverage, rtol=0, atol=1e-15)
    for value in o.values():
        assert value.dtype == np.float64 and value.shape == (3, 3)


def test_coverage_is_asymmetric_row_is_denominator():
    cov = overlap_matrices(np.stack([A, D]))["coverage"]
    assert cov[0, 1] == 1.0  # A lies entirely inside D
    assert cov[1, 0] == 0.5  # D is half covered by A
    for key in ("iou", "dice"):
        m = overlap_matrices(np.stack([A, B, D]))[key]
        np.testing.assert_array_equal(m, m.T)


def test_empty_mask_rules():
    o = overlap_matrices(np.stack([A, C, E]))
    np.testing.assert_array_equal(o["iou"], [[1, 0, 0], [0, NAN, NAN], [0, NAN, NAN]])
    np.testing.assert_array_equal(o["dice"], [[1, 0, 0], [0, NAN, NAN], [0, NAN, NAN]])
    # Row = denominator: an empty row is undefined, an empty column scores 0.
    np.testing.assert_array_equal(o["coverage"], [[1, 0, 0], [NAN, NAN, NAN], [NAN, NAN, NAN]])


def test_overlap_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 16, 16)) < rng.random((5, 1, 1))
    masks[3] = False
    o = overlap_matrices(masks)
    for a in range(5):
        for b in range(5):
            inter = np.sum(masks[a] & masks[b])
            union = np.sum(masks[a] | masks[b])
            size_a, size_b = masks[a].sum(), masks[b].sum()
            expected = {
                "iou": inter / union if union else NAN,
                "dice": 2 * inter / (size_a + size_b) if size_a + size_b else NAN,
                "coverage": inter / size_a if size_a else NAN,
            }
            for key, value in expected.items():
                np.testing.assert_allclose(o[key][a, b], value, rtol=1e-15)


def test_overlap_input_types():
    stack = np.stack([A, B, C])
    expected = overlap_matrices(stack)
    for variant in (stack.astype(np.uint8), stack.astype(np.float32), torch.from_numpy(stack)):
        got = overlap_matrices(variant)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(ValueError, match="binary"):
        overlap_matrices(stack * 2)
    with pytest.raises(ValueError, match="shape"):
        overlap_matrices(np.ones(4, dtype=bool))


def test_overlap_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overlap_matrices(np.zeros((3, 4, 4), dtype=bool))


def test_aggregate_excludes_nan_and_counts():
    m1 = np.array([[1.0, 0.2], [NAN, 1.0]])
    m2 = np.array([[1.0, 0.4], [NAN, NAN]])
    m3 = np.array([[1.0, NAN], [NAN, 0.5]])
    mean, count = aggregate_matrices([m1, m2, m3])
    np.testing.assert_allclose(mean, [[1.0, 0.3], [NAN, 0.75]])
    np.testing.assert_array_equal(count, [[3, 2], [0, 2]])
    assert count.dtype == np.int64
    mean_stacked, count_stacked = aggregate_matrices(np.stack([m1, m2, m3]))
    np.testing.assert_array_equal(mean_stacked, mean)
    np.testing.assert_array_equal(count_stacked, count)


def test_aggregate_all_nan_and_empty_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, count = aggregate_matrices([np.full((2, 2), NAN)] * 3)
        assert np.isnan(mean).all() and not count.any()
        mean, count = aggregate_matrices(np.zeros((0, 2, 2)))
        assert mean.shape == (2, 2) and np.isnan(mean).all() and not count.any()
    with pytest.raises(ValueError, match="at least one"):
        aggregate_matrices([])


def test_aggregate_over_images_of_overlap_matrices():
    # Image 1: A vs B; image 2: both empty (undefined, excluded, not scored 0).
    per_image = [
        overlap_matrices(np.stack([A, B]))["iou"],
        overlap_matrices(np.stack([C, E]))["iou"],
    ]
    mean, count = aggregate_matrices(per_image)
    np.testing.assert_allclose(mean, [[1, 1 / 3], [1 / 3, 1]])
    np.testing.assert_array_equal(count, [[1, 1], [1, 1]])


def test_mask_vs_truth_hand_computed():
    r = mask_vs_truth(A, B)
    assert r == pytest.approx({"iou": 1 / 3, "dice": 1 / 2, "coverage": 1 / 2, "recall": 1 / 2})
    r = mask_vs_truth(A, D)  # mask inside the object
    assert r == pytest.approx({"iou": 1 / 2, "dice": 2 / 3, "coverage": 1.0, "recall": 1 / 2})
    assert all(type(v) is float for v in r.values())
    r = mask_vs_truth(torch.from_numpy(D), D.astype(np.uint8))
    assert r == {"iou": 1.0, "dice": 1.0, "coverage": 1.0, "recall": 1.0}


def test_mask_vs_truth_nan_rules():
    r = mask_vs_truth(C, A)  # empty mask, non-empty truth
    assert r["iou"] == 0 and r["dice"] == 0 and r["recall"] == 0 and np.isnan(r["coverage"])
    r = mask_vs_truth(A, C)  # empty truth
    assert r["iou"] == 0 and r["dice"] == 0 and r["coverage"] == 0 and np.isnan(r["recall"])
    r = mask_vs_truth(C, E)
    assert all(np.isnan(v) for v in r.values())


def test_mask_vs_truth_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        mask_vs_truth(A, np.zeros((4, 2), dtype=bool))
