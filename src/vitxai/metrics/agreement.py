"""Overlap agreement between binary masks: IoU, Dice and Coverage Ratio.

For masks A and B (sets of salient pixels, e.g. from :func:`vitxai.masks.unified_mask`):

- IoU(A, B) = |A ∩ B| / |A ∪ B| (Jaccard index), symmetric, in [0, 1];
- Dice(A, B) = 2 |A ∩ B| / (|A| + |B|), symmetric, in [0, 1];
- Coverage(A -> B) = |A ∩ B| / |A|, asymmetric, in [0, 1]: the share of A's region
  that B also marks. This is the Coverage Ratio of the original comparison [1]_.

Undefined values. A ratio whose denominator is 0 is undefined and returned as NaN:
IoU and Dice when both masks are empty, Coverage(A -> B) when A is empty. The original
comparison scored these cases 0, which made two methods that both mark nothing look
like they disagree completely (``docs/differences.md`` §8, defect 10).
:func:`aggregate_matrices` excludes NaN from the mean and reports how many images each
mean is based on. One empty and one non-empty mask is a defined total disagreement:
IoU = Dice = 0, Coverage(non-empty -> empty) = 0.

Inputs may be NumPy arrays or torch tensors of bool, or of numbers equal to 0 or 1.

References
----------
.. [1] A. Grobrügge, N. Mishra, J. Jakubik, G. Satzger, arXiv:2410.20873, 2024;
       code: https://github.com/grobruegge/ViTExplComp (the original comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor"]

__all__ = ["aggregate_matrices", "mask_vs_truth", "overlap_matrices"]


def overlap_matrices(masks: ArrayLike) -> dict[str, np.ndarray]:
    """IoU, Dice and Coverage between every pair of masks of one image.

    Parameters
    ----------
    masks : ndarray or Tensor, shape (M, H, W)
        One binary mask per method (bool, or numbers equal to 0 or 1). Any trailing
        shape is accepted; the masks are compared pixel by pixel after flattening.

    Returns
    -------
    dict with keys "iou", "dice", "coverage", each an ndarray of float64, shape (M, M)
        ``iou[a, b]`` and ``dice[a, b]`` are symmetric. ``coverage[a, b]`` is
        ``|A ∩ B| / |A|`` with A = mask ``a`` (the row) as denominator, so
        ``coverage[a, b] != coverage[b, a]`` in general. Values lie in [0, 1] or are NaN
        where undefined:

        - IoU, Dice: NaN when both masks are empty, 0 when exactly one is;
        - Coverage[a, b]: NaN when mask ``a`` is empty, 0 when only ``b`` is;
        - diagonal: 1 for a non-empty mask, NaN for an empty one.

    Raises
    ------
    ValueError
        If ``masks`` has fewer than 2 axes or is not binary.

    Notes
    -----
    Intersections of all pairs come from one matrix product of the flattened masks,
    ``X @ X.T`` with X of shape (M, H*W), computed in float64, which is exact for
    masks of fewer than 2**53 pixels.
    """
    m = _as_binary(masks, "masks")
    if m.ndim < 2:
        raise ValueError(f"masks must have shape (M, H, W), got {m.shape}")
    x = m.reshape(m.shape[0], -1).astype(np.float64)
    inter = x @ x.T
    size = x.sum(axis=1)
    size_a, size_b = size[:, None], size[None, :]
    return {
        "iou": _ratio(inter, size_a + size_b - inter),
        "dice": _ratio(2.0 * inter, size_a + size_b),
        "coverage": _ratio(inter, np.broadcast_to(size_a, inter.shape)),
    }


def aggregate_matrices(
    matrices: Sequence[np.ndarray] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-image values over images, ignoring undefined (NaN) entries.

    Parameters
    ----------
    matrices : sequence of ndarray of shape (M, M), or ndarray of shape (I, M, M)
        One matrix per image, e.g. ``overlap_matrices(masks_i)["iou"]``. Any per-image
        shape is accepted (e.g. shape (I,) for the scalars of :func:`mask_vs_truth`),
        as long as all images share it.

    Returns
    -------
    mean : ndarray of float64, shape (M, M)
        Mean over the images where the entry is defined; NaN where it is defined for
        no image (no warning is emitted).
    count : ndarray of int64, shape (M, M)
        Number of images where the entry is defined (not NaN), in [0, I].

    Raises
    ------
    ValueError
        If ``matrices`` is an empty sequence (the per-image shape is then unknown) or a
        0-d array. A stacked array with I = 0 gives mean NaN and count 0.
    """
    if not isinstance(matrices, np.ndarray) and len(matrices) == 0:
        raise ValueError("matrices must contain at least one matrix")
    stack = np.asarray(matrices, dtype=np.float64)
    if stack.ndim == 0:
        raise ValueError("matrices must have shape (I, M, M), got a scalar")
    defined = ~np.isnan(stack)
    count = defined.sum(axis=0, dtype=np.int64)
    total = np.where(defined, stack, 0.0).sum(axis=0)
    return _ratio(total, count), count


def mask_vs_truth(mask: ArrayLike, truth: ArrayLike) -> dict[str, float]:
    """Overlap of one predicted mask with a ground-truth mask.

    Parameters
    ----------
    mask : ndarray or Tensor, shape (H, W)
        Binary mask M of a method (bool, or numbers equal to 0 or 1).
    truth : ndarray or Tensor, shape (H, W)
        Binary ground-truth object mask T.

    Returns
    -------
    dict of float, each in [0, 1] or NaN where undefined
        - "iou": |M ∩ T| / |M ∪ T|; NaN when both are empty;
        - "dice": 2 |M ∩ T| / (|M| + |T|); NaN when both are empty;
        - "coverage": |M ∩ T| / |M| (precision: the share of the mask on the object);
          NaN when M is empty;
        - "recall": |M ∩ T| / |T| (the share of the object that the mask finds);
          NaN when T is empty.

    Raises
    ------
    ValueError
        If the shapes differ or an input is not binary.

    Notes
    -----
    The same rules as :func:`overlap_matrices`, of which this is the (mask, truth)
    pair: ``coverage`` is ``coverage[mask, truth]`` and ``recall`` is
    ``coverage[truth, mask]``.
    """
    m = _as_binary(mask, "mask")
    t = _as_binary(truth, "truth")
    if m.shape != t.shape:
        raise ValueError(f"mask and truth must have the same shape, got {m.shape} and {t.shape}")
    o = overlap_matrices(np.stack([m, t]))
    return {
        "iou": float(o["iou"][0, 1]),
        "dice": float(o["dice"][0, 1]),
        "coverage": float(o["coverage"][0, 1]),
        "recall": float(o["coverage"][1, 0]),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den > 0``, NaN elsewhere, without warnings."""
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _as_binary(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a binary array or tensor to a bool NumPy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (values 0 or 1)")
    return arr.astype(bool, copy=False)
