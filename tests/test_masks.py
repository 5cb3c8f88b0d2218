"""Tests for the unified mask pipeline (vitxai.masks)."""

import dataclasses

import numpy as np
import pytest
import torch

from vitxai.masks import (
    MaskParams,
    clip_negative,
    close_mask,
    fill_mask_holes,
    filter_components,
    normalize_unit,
    otsu_binarize,
    to_single_channel,
    unified_mask,
    unified_masks,
)

H = W = 32


def _rect(r0, r1, c0, c1, shape=(H, W)):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def _bimodal(blob, seed=0):
    """Background values in [0, 0.1], blob values in [0.9, 1.0]."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0.0, 0.1, blob.shape)
    high = rng.uniform(0.9, 1.0, blob.shape)
    return np.where(blob, high, low)


# --- MaskParams -----------------------------------------------------------------------


def test_params_defaults():
    assert dataclasses.asdict(MaskParams()) == {
        "clip_negative": True,
        "channel_reduce": "mean",
        "otsu_nbins": 256,
        "postprocess": True,
        "closing_size": 6,
        "closing_mode": "reflect",
        "fill_holes": True,
        "hole_connectivity": 4,
        "component_percentile": 80.0,
        "connectivity": 8,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskParams().closing_size = 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_negative", 1),
        ("channel_reduce", "median"),
        ("otsu_nbins", 1),
        ("otsu_nbins", 2.5),
        ("postprocess", "yes"),
        ("closing_size", 0),
        ("closing_size", True),
        ("closing_mode", "constant"),
        ("fill_holes", None),
        ("hole_connectivity", 6),
        ("component_percentile", -0.1),
        ("component_percentile", 100.5),
        ("component_percentile", float("nan")),
        ("connectivity", 2),
    ],
)
def test_params_validation(field, value):
    with pytest.raises(ValueError, match=field) as info:
        MaskParams(**{field: value})
    assert "\n" not in str(info.value)


# --- single steps ---------------------------------------------------------------------


def test_clip_negative():
    x = np.array([[-2.0, 0.0], [0.5, 3.0]])
    np.testing.assert_array_equal(clip_negative(x), [[0.0, 0.0], [0.5, 3.0]])
    assert not clip_negative(-np.ones((4, 4))).any()


def test_to_single_channel_mean_and_max():
    x = np.arange(3 * 4 * 5, dtype=float).reshape(3, 4, 5)
    np.testing.assert_allclose(to_single_channel(x), (x[0] + x[1] + x[2]) / 3)
    np.testing.assert_array_equal(to_single_channel(x, "max"), x[2])
    np.testing.assert_array_equal(to_single_channel(x[0]), x[0])
    with pytest.raises(ValueError, match="shape"):
        to_single_channel(np.zeros((1, 3, 4, 5)))
    with pytest.raises(ValueError, match="shape"):
        to_single_channel(np.zeros(5))
    with pytest.raises(ValueError, match="reduce"):
        to_single_channel(x, "sum")


def test_normalize_unit_range_and_constant_maps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(H, W)) * 1e-6 - 3.0
    y = normalize_unit(x)
    assert y.min() == 0.0 and y.max() == 1.0
    np.testing.assert_allclose(y, (x - x.min()) / (x.max() - x.min()), atol=1e-12)
    for constant in (np.zeros((H, W)), np.full((H, W), 7.5), np.full((H, W), -2.0)):
        out = normalize_unit(constant)
        assert np.isfinite(out).all() and not out.any()
    assert normalize_unit(np.zeros((0, 3))).shape == (0, 3)


def test_normalize_unit_extreme_values_no_nan():
    x = np.array([[-1e308, 0.0], [1e308, 5e307]])
    y = normalize_unit(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, [[0.0, 0.5], [1.0, 0.75]])


def test_nan_and_inf_rejected():
    x = np.zeros((H, W))
    x[3, 3] = np.nan
    with pytest.raises(ValueError, match="attribution contains NaN"):
        unified_mask(x)
    with pytest.raises(ValueError, match="attribution contains NaN"):
        normalize_unit(torch.from_numpy(x))
    x[3, 3] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        unified_mask(x)


def test_otsu_separates_bimodal_map_exactly():
    blob = _rect(5, 15, 8, 20)
    np.testing.assert_array_equal(otsu_binarize(_bimodal(blob)), blob)


def test_otsu_uses_float_values_not_uint8():
    # All foreground values lie within 1/255 of the background: truncating 255 * x to
    # uint8 would merge them, the float threshold keeps them apart.
    blob = _rect(0, 8, 0, 8)
    x = np.where(blob, 0.003, 0.001)
    assert np.unique((255 * x).astype(np.uint8)).size == 1
    np.testing.assert_array_equal(otsu_binarize(x), blob)


def test_otsu_constant_map_is_empty():
    for value in (0.0, 0.5, 1.0):
        out = otsu_binarize(np.full((H, W), value))
        assert out.dtype == bool and not out.any()


def test_otsu_validation():
    with pytest.raises(ValueError, match="image"):
        otsu_binarize(np.zeros((3, H, W)))
    with pytest.raises(ValueError, match="nbins"):
        otsu_binarize(np.zeros((H, W)), nbins=1)


def test_close_mask_fills_one_pixel_gap():
    mask = _rect(10, 20, 5, 15) | _rect(10, 20, 16, 26)  # column 15 is a 1-px gap
    closed = close_mask(mask)
    np.testing.assert_array_equal(closed, _rect(10, 20, 5, 26))
    assert np.all(closed >= mask)  # closing is extensive
    np.testing.assert_array_equal(close_mask(mask, size=1), mask)
    assert not close_mask(np.zeros((H, W), dtype=bool)).any()


def test_close_mask_accepts_numeric_and_tensor_masks():
    mask = _rect(10, 20, 5, 15) | _rect(10, 20, 16, 26)
    expected = close_mask(mask)
    np.testing.assert_array_equal(close_mask(mask.astype(np.uint8)), expected)
    np.testing.assert_array_equal(close_mask(torch.from_numpy(mask)), expected)
    with pytest.raises(ValueError, match="binary"):
        close_mask(mask * 2)
    with pytest.raises(ValueError, match="size"):
        close_mask(mask, size=0)
    with pytest.raises(ValueError, match="mode"):
        close_mask(mask, mode="zero")


def test_fill_mask_holes():
    ring = _rect(4, 14, 4, 14) & ~_rect(6, 12, 6, 12)
    np.testing.assert_array_equal(fill_mask_holes(ring), _rect(4, 14, 4, 14))
    assert not fill_mask_holes(np.zeros((H, W), dtype=bool)).any()


def test_fill_mask_holes_connectivity():
    # A 5x5 outline whose corner is missing: the inside touches the outside only
    # diagonally, so it is a hole for 4-connected background but not for 8.
    ring = _rect(0, 5, 0, 5, (7, 7)) & ~_rect(1, 4, 1, 4, (7, 7))
    ring[0, 0] = False
    filled = _rect(0, 5, 0, 5, (7, 7))
    filled[0, 0] = False
    np.testing.assert_array_equal(fill_mask_holes(ring, connectivity=4), filled)
    np.testing.assert_array_equal(fill_mask_holes(ring, connectivity=8), ring)


def _components(sides):
    """Separate squares of the given sides on one row, 2 px apart; areas side**2."""
    mask = np.zeros((10, 2 + sum(s + 2 for s in sides)), dtype=bool)
    squares, col = [], 2
    for s in sides:
        square = np.zeros_like(mask)
        square[2 : 2 + s, col : col + s] = True
        squares.append(square)
        mask |= square
        col += s + 2
    return mask, squares


@pytest.mark.parametrize(
    "percentile, kept",
    [
        (80.0, [4]),  # cutoff 16 + 0.2 * 9 = 17.8
        (75.0, [3, 4]),  # cutoff exactly 16: inclusive
        (50.0, [2, 3, 4]),  # cutoff 9
        (0.0, [0, 1, 2, 3, 4]),
        (100.0, [4]),
    ],
)
def test_filter_components_known_areas(percentile, kept):
    mask, squares = _components([1, 2, 3, 4, 5])  # areas 1, 4, 9, 16, 25
    expected = np.zeros_like(mask)
    for i in kept:
        expected |= squares[i]
    np.testing.assert_array_equal(filter_components(mask, percentile), expected)


def test_filter_components_single_and_equal_components_kept():
    single, _ = _components([3])
    np.testing.assert_array_equal(filter_components(single), single)
    equal, _ = _components([3, 3, 3, 3])
    np.testing.assert_array_equal(filter_components(equal), equal)
    empty = np.zeros((H, W), dtype=bool)
    out = filter_components(empty)
    assert out.dtype == bool and out.shape == (H, W) and not out.any()


def test_filter_components_connectivity():
    mask, squares = _components([4, 4])
    mask[6, 1] = True  # touches the first square diagonally only
    both = squares[0] | squares[1]
    np.testing.assert_array_equal(filter_components(mask, 50.0, connectivity=4), both)
    np.testing.assert_array_equal(
        filter_components(mask, 100.0, connectivity=8), mask & ~squares[1]
    )


# --- the full pipeline ----------------------------------------------------------------


@pytest.mark.parametrize(
    "attribution",
    [np.zeros((H, W)), np.full((H, W), 3.0), -np.ones((H, W)), -np.arange(H * W).reshape(H, W)],
    ids=["all-zero", "constant", "all-negative-constant", "all-negative"],
)
def test_unified_mask_degenerate_maps_are_empty(attribution):
    for params in (MaskParams(), MaskParams(postprocess=False)):
        out = unified_mask(attribution, params)
        assert out.dtype == bool and out.shape == (H, W) and not out.any()


def test_unified_mask_bimodal_blob_recovered():
    blob = _rect(5, 15, 8, 20)
    np.testing.assert_array_equal(unified_mask(_bimodal(blob)), blob)


def test_unified_mask_keeps_single_and_equal_components():
    one = _rect(10, 18, 10, 18)
    np.testing.assert_array_equal(unified_mask(_bimodal(one)), one)
    two = _rect(4, 10, 4, 10) | _rect(20, 26, 20, 26)  # equal areas
    np.testing.assert_array_equal(unified_mask(_bimodal(two)), two)


def test_unified_mask_postprocessing_steps():
    # Shapes at least 6 px from each other and from the border (with "reflect", the
    # closing would otherwise bridge a shape to its mirror image across the border).
    shape = (40, 40)
    rng = np.random.default_rng(1)
    outer = _rect(6, 22, 6, 32, shape)
    hole = _rect(10, 18, 9, 16, shape)  # larger than the 6x6 footprint: closing keeps it
    big = outer & ~_rect(6, 22, 19, 20, shape) & ~hole  # a 1-px gap at column 19, a hole
    small = _rect(30, 32, 15, 17, shape)  # area 4, below the 80th percentile of the areas
    x = np.where(big | small, 1.0, 0.0) + rng.uniform(0, 0.01, shape)
    bare = unified_mask(x, MaskParams(postprocess=False))
    np.testing.assert_array_equal(bare, big | small)
    np.testing.assert_array_equal(unified_mask(x), outer)
    no_fill = unified_mask(x, MaskParams(fill_holes=False))
    np.testing.assert_array_equal(no_fill, outer & ~hole)
    keep_all = unified_mask(x, MaskParams(component_percentile=0.0))
    np.testing.assert_array_equal(keep_all, outer | small)


def test_close_mask_border_gaps():
    near = _rect(2, 12, 10, 20)  # a 2-px gap to the top border
    far = _rect(4, 12, 10, 20)  # a 4-px gap: wider than 6 / 2
    touching = _rect(0, 12, 10, 20)
    for mode in ("reflect", "nearest", "mirror"):
        np.testing.assert_array_equal(close_mask(near, mode=mode), touching)
        np.testing.assert_array_equal(close_mask(far, mode=mode), far)
    np.testing.assert_array_equal(close_mask(near, mode="wrap"), near)
    for mode in ("reflect", "nearest", "mirror", "wrap"):
        np.testing.assert_array_equal(close_mask(touching, mode=mode), touching)


def test_unified_mask_channel_mean_of_three_channels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, H, W))
    expected = unified_mask(np.clip(x, 0, None).mean(axis=0))
    np.testing.assert_array_equal(unified_mask(x), expected)
    expected_max = unified_mask(np.clip(x, 0, None).max(axis=0))
    np.testing.assert_array_equal(unified_mask(x, MaskParams(channel_reduce="max")), expected_max)


def test_unified_mask_clip_negative_switch():
    # Strong negative evidence on the left, weak positive blob on the right.
    x = np.zeros((H, W))
    x[:, :8] = -10.0
    x[10:20, 20:28] = 1.0
    np.testing.assert_array_equal(unified_mask(x), _rect(10, 20, 20, 28))
    signed = unified_mask(x, MaskParams(clip_negative=False))
    assert not signed[:, :8].any() and signed[:, 8:].all()


def test_unified_mask_torch_and_numpy_agree():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, H, W)).astype(np.float32)
    expected = unified_mask(x)
    np.testing.assert_array_equal(unified_mask(torch.from_numpy(x)), expected)
    grad = torch.from_numpy(x).requires_grad_(True)
    np.testing.assert_array_equal(unified_mask(grad), expected)


def test_unified_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        unified_mask(np.zeros((2, 3, H, W)))


def test_unified_masks_equals_per_image():
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(4, H, W))
    maps[1] = 0.0  # an all-zero map in the batch
    maps[2] = _bimodal(_rect(3, 9, 3, 9))
    params = MaskParams(closing_size=3, component_percentile=50.0)
    out = unified_masks(maps, params)
    assert out.dtype == bool and out.shape == (4, H, W)
    for i in range(4):
        np.testing.assert_array_equal(out[i], unified_mask(maps[i], params))
    np.testing.assert_array_equal(unified_masks(torch.from_numpy(maps), params), out)
    assert not out[1].any()


def test_unified_masks_with_channels_and_empty_batch():
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(2, 3, H, W))
    out = unified_masks(maps)
    assert out.shape == (2, H, W)
    for i in range(2):
        np.testing.assert_array_equal(out[i], unified_mask(maps[i]))
    assert unified_masks(np.zeros((0, H, W))).shape == (0, H, W)
    with pytest.raises(ValueError, match="shape"):
        unified_masks(np.zeros((H, W)))
