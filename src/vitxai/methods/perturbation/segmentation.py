"""Superpixels for LIME and KernelSHAP: quickshift or SLIC on the displayable [0, 1] image.

Images of a batch are segmented in parallel threads (:func:`segment`); the segmentation of a
batch is computed once and shared by both methods through the
:class:`~vitxai.methods.base.BatchContext` cache (:func:`shared_segments`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from vitxai.methods.base import BatchContext, CacheKey
from vitxai.params import build, check_choice, check_instance_types, check_range


@dataclass(frozen=True)
class SegmentationParams:
    """How superpixels are made (shared by LIME and KernelSHAP).

    Attributes:
        algorithm: "quickshift" (lime_image's default) or "slic".
        kernel_size, max_dist, ratio: quickshift's parameters; the defaults (4, 200, 0.2) are
            lime_image's.
        n_segments, compactness: SLIC's parameters; SLIC yields somewhat fewer superpixels
            than ``n_segments`` (≈ 60 gives ≈ 50 on 224-pixel images).
        seed: quickshift's ``rng``, which breaks ties between equal densities randomly.
    """

    algorithm: Literal["quickshift", "slic"] = "quickshift"
    kernel_size: float = 4.0
    max_dist: float = 200.0
    ratio: float = 0.2
    n_segments: int = 50
    compactness: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_instance_types(self, prefix="segmentation.")
        check_choice("segmentation.algorithm", self.algorithm, ("quickshift", "slic"))
        check_range("segmentation.kernel_size", self.kernel_size, 0, None, low_open=True)
        check_range("segmentation.max_dist", self.max_dist, 0, None, low_open=True)
        check_range("segmentation.ratio", self.ratio, 0.0, 1.0)
        check_range("segmentation.n_segments", self.n_segments, 1, None)
        check_range("segmentation.compactness", self.compactness, 0, None, low_open=True)


def as_segmentation(value: SegmentationParams | dict[str, Any]) -> SegmentationParams:
    """Accept a mapping (as parsed from a CLI or config file) for the nested parameters."""
    if isinstance(value, SegmentationParams):
        return value
    if isinstance(value, dict):
        return build(SegmentationParams, value, "segmentation")
    raise ValueError(f"parameter segmentation={value!r} must be SegmentationParams or a dict")


def segment(images: torch.Tensor, params: SegmentationParams | None = None) -> torch.Tensor:
    """Superpixels of each image, computed on the unnormalised displayable image.

    Images are segmented in parallel threads (up to torch's thread count): scikit-image's
    quickshift and SLIC release the GIL, and each image's labels depend on that image only.

    Args:
        images: (B, 3, H, W) float in [0, 1] (any device or dtype).
        params: the algorithm and its settings; defaults to quickshift as lime_image.

    Returns:
        (B, H, W) int64 CPU labels, relabelled per image to 0..S_b−1 (so S_b = max + 1).
    """
    from skimage import segmentation  # lazy: importing skimage costs ~0.7 s

    params = params or SegmentationParams()
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def one(image: np.ndarray) -> np.ndarray:
        if params.algorithm == "quickshift":
            labels = segmentation.quickshift(
                image, ratio=params.ratio, kernel_size=params.kernel_size,
                max_dist=params.max_dist, rng=params.seed,
            )
        else:
            labels = segmentation.slic(
                image, n_segments=params.n_segments, compactness=params.compactness,
                start_label=0,
            )
        # Labels need not be contiguous (SLIC drops merged ones); features are 0..S-1.
        return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)

    images64 = list(pixels.astype(np.float64))
    workers = min(len(images64), max(1, torch.get_num_threads()))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(one, images64))
    else:
        out = [one(image) for image in images64]
    return torch.from_numpy(np.stack(out).astype(np.int64))


def shared_segments(context: BatchContext, images: torch.Tensor,
                    params: SegmentationParams) -> torch.Tensor:
    """:func:`segment`, memoised in ``context.cache`` so methods on one batch segment once."""
    key = CacheKey("segments", (params, tuple(images.shape)))
    labels, _ = context.cached(key, lambda: segment(images, params))
    return labels


def num_segments(segments: torch.Tensor) -> torch.Tensor:
    """(B,) long: S_b, the number of superpixels of each image of a (B, H, W) label map."""
    return segments.flatten(1).amax(1) + 1
