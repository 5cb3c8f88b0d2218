"""Scores of one attribution map against a ground-truth object mask.

All functions take one (H, W) signed map and one (H, W) boolean truth mask and return a float;
NaN means undefined (empty truth, or no positive attribution), never an error.
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
