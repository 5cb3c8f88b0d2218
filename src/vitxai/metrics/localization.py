"""Scores of one attribution map against ground-truth object masks.

All functions take one (H, W) signed map and (H, W) boolean truth masks and return a float;
NaN means undefined (empty truth, or no positive attribution), never an error.

References: L. Arras, A. Osman, W. Samek, "CLEVR-XAI: A benchmark dataset for the ground truth
evaluation of neural network explanations", Information Fusion 81, 2022 (relevance mass and
rank accuracy); J. Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016 /
IJCV 2018 (pointing game).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(attribution: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(attribution, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    if a.shape != t.shape or a.ndim != 2:
        raise ValueError(f"map {a.shape} and truth {t.shape} must be equal (H, W) shapes")
    return a, t


def pointing_game(attribution: ArrayLike, truth: ArrayLike) -> float:
    """Share of the maximal pixels that lie inside the truth (Zhang et al. 2018, ECCV).

    Without ties this is 1.0 (hit) or 0.0 (miss). Superpixel and upsampled patch maps have
    tied maxima; counting the share of tied pixels inside keeps the score independent of
    pixel order (an arbitrary first argmax would not be). NaN for an empty truth.

    Returns:
        float in [0, 1], or NaN.
    """
    a, t = _pair(attribution, truth)
    if not t.any():
        return float("nan")
    top = a == a.max()
    return float((top & t).sum() / top.sum())


def mass_inside(attribution: ArrayLike, truth: ArrayLike) -> float:
    """Relevance mass accuracy: Σ max(a, 0)·T / Σ max(a, 0) (Arras et al. 2022, CLEVR-XAI).

    Returns:
        float in [0, 1]; NaN when the map has no positive attribution or the truth is empty.
    """
    a, t = _pair(attribution, truth)
    pos = np.clip(a, 0.0, None)
    total = pos.sum()
    if total <= 0 or not t.any():
        return float("nan")
    return float(pos[t].sum() / total)


def rank_accuracy(attribution: ArrayLike, truth: ArrayLike) -> float:
    """Relevance rank accuracy: share of the |T| highest-valued pixels that lie in T.

    Arras et al. 2022 (CLEVR-XAI): with K = |T| truth pixels, take the K pixels of highest
    attribution and count those inside T, divided by K. Pixels are ranked by their signed
    value (most positive first), as in :func:`pointing_game`.

    Ties. When the K-th highest value is shared by pixels both above and below the cut, the
    score is its exact expectation under a uniformly random choice among the tied pixels:
    with g pixels strictly above the K-th value (g_in of them in T) and e pixels equal to
    it (e_in in T), the score is (g_in + (K − g) · e_in / e) / K. This keeps the score
    independent of pixel order for superpixel and upsampled patch maps; a constant map
    scores K / (H·W), the value of a random map.

    Args:
        attribution: (H, W) finite signed map.
        truth: (H, W) boolean object mask T.

    Returns:
        float in [0, 1]: 1 when the K top pixels are exactly T, 0 when none is in T; 1 for
        a truth covering the whole image; NaN for an empty truth.

    Raises:
        ValueError: on different or non-2-D shapes, or a non-finite map.
    """
    a, t = _pair(attribution, truth)
    _check_finite(a)
    k = int(t.sum())
    if k == 0:
        return float("nan")
    flat, inside = a.ravel(), t.ravel()
    kth = np.partition(flat, flat.size - k)[flat.size - k]  # the K-th highest value
    above, at = flat > kth, flat == kth
    expected = (above & inside).sum() + (k - above.sum()) * (at & inside).sum() / at.sum()
    return float(expected / k)


def class_discrimination(map_for_a: ArrayLike, mask_a: ArrayLike, mask_b: ArrayLike) -> float:
    """Positive relevance on object A minus that on object B, for a map explaining A.

    For an image holding two objects A and B of different classes (the two-object split),
    a map computed for A's class should put its evidence on A:
    Σ max(a, 0)·T_A / Σ max(a, 0) − Σ max(a, 0)·T_B / Σ max(a, 0), i.e.
    ``mass_inside(map, A) − mass_inside(map, B)``. Negative attribution is ignored, as in
    :func:`mass_inside`. Pixels in both masks count for both and cancel; the background
    counts for neither, so 0 means either equal mass on both objects or none on either.

    Args:
        map_for_a: (H, W) finite signed map explaining the class of object A.
        mask_a: (H, W) boolean mask of object A.
        mask_b: (H, W) boolean mask of object B.

    Returns:
        float in [−1, 1]: 1 when all positive mass is on A (and off B), −1 when all of it
        is on B; NaN when the map has no positive attribution or either mask is empty
        (without both objects the split does not apply).

    Raises:
        ValueError: on different or non-2-D shapes, or a non-finite map.
    """
    a, t_a = _pair(map_for_a, mask_a)
    _, t_b = _pair(map_for_a, mask_b)
    _check_finite(a)
    pos = np.clip(a, 0.0, None)
    total = pos.sum()
    if total <= 0 or not t_a.any() or not t_b.any():
        return float("nan")
    return float((pos[t_a].sum() - pos[t_b].sum()) / total)


def _check_finite(a: np.ndarray) -> None:
    # A NaN would silently fall out of every comparison and bias the score.
    if not np.isfinite(a).all():
        raise ValueError("attribution contains NaN or infinite values")
