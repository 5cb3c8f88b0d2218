"""LIME's and KernelSHAP's features: superpixels (pixel space) or patches (token space).

In token space a feature is one patch, or with ``grid`` one cell of a grid × grid partition
of the patch grid (e.g. 2 × 2 patches per cell for grid 7 on a 14 × 14 grid): the regressions
then have about as many features as superpixels, and converge as fast (docs/methods.md).
Per-feature values (B, S_max) become maps here: superpixel natives (NaN-padded beyond each
image's S_b) expanded to pixels, or (B, gh, gw) patch natives (each patch its cell's value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vitxai.methods.base import Attribution, BatchContext, Cost
from vitxai.methods.perturbation.engine import Space, grid_attribution
from vitxai.methods.perturbation.segmentation import SegmentationParams, shared_segments
from vitxai.methods.perturbation.tokens import token_vit
from vitxai.params import check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter, ViTAdapter


def patch_segments(adapter: ViTAdapter, images: torch.Tensor, grid: int | None = None
                   ) -> torch.Tensor:
    """(B, gh, gw) int64 CPU labels of the patches' features.

    ``grid`` None: patch (r, c) is feature r·gw + c (token order). Else cells of a grid ×
    grid partition (1 ≤ grid ≤ min(gh, gw)): patch (r, c) is feature
    ⌊r·grid/gh⌋·grid + ⌊c·grid/gw⌋, cells of ⌊gh/grid⌋ or ⌈gh/grid⌉ patches a side.

    Raises:
        ValueError: a grid finer than the patch grid (some cells would hold no patch).
    """
    gh, gw = adapter.grid_of(images)
    if grid is None:
        labels = torch.arange(gh * gw).view(gh, gw)
    else:
        if grid > min(gh, gw):
            raise ValueError(f"parameter grid={grid} is finer than the {gh}×{gw} patch grid of "
                             f"{adapter.name!r}: use grid ≤ {min(gh, gw)}, or None for one "
                             "feature per patch")
        rows = torch.arange(gh) * grid // gh
        cols = torch.arange(gw) * grid // gw
        labels = rows[:, None] * grid + cols[None, :]
    return labels[None].repeat(images.shape[0], 1, 1)


def _expand_to_pixels(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, S_max) per-superpixel values → (B, H, W) maps (same dtype; attribute() casts)."""
    flat = values.gather(1, segments.flatten(1).to(values.device))
    return flat.view(segments.shape)


def _padded_native(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, S_max) values with NaN beyond each image's S_b."""
    real = torch.arange(values.shape[1])[None] < counts[:, None]
    return torch.where(real, values, torch.full_like(values, float("nan")))


def feature_segments(adapter: ModelAdapter, images: torch.Tensor, context: BatchContext,
                     method: str, space: Space, segmentation: SegmentationParams,
                     grid: int | None = None) -> torch.Tensor:
    """LIME's and KernelSHAP's features: superpixels (pixel space) or patches, one per feature
    or grouped in ``grid`` × ``grid`` cells (token space, :func:`patch_segments`)."""
    if space == "token":
        return patch_segments(token_vit(adapter, method), images, grid)
    return shared_segments(context, images, segmentation)


def feature_areas(segments: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, S_max) float64 pixels (superpixels) or patches (token cells) per feature, 0 on
    padding; ``segments`` (B, H, W) or (B, gh, gw) labels 0..S_b − 1 as from
    :func:`feature_segments`."""
    flat = segments.flatten(1).cpu()
    areas = torch.zeros(len(flat), int(counts.max()), dtype=torch.float64)
    return areas.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))


def check_feature_grid(grid: int | None, space: object) -> None:
    """One-line ValueError unless ``grid`` is None or an integer ≥ 1 with space "token"."""
    if grid is None:
        return
    check_range("grid", grid, 1, None)
    if space != "token":
        raise ValueError(f"parameter grid={grid} groups patch tokens and needs space='token'; "
                         "pixel space uses superpixels (see segmentation)")


def feature_attribution(method: str, values: torch.Tensor, segments: torch.Tensor,
                        counts: torch.Tensor, space: Space, images: torch.Tensor,
                        targets: torch.Tensor, cost: Cost) -> Attribution:
    """Wrap (B, S_max) feature values: superpixel natives, or (B, gh, gw) patch natives."""
    if space == "token":
        patches = values.gather(1, segments.flatten(1).to(values.device)).view(segments.shape)
        return grid_attribution(method, patches, space, images, targets, cost)
    return Attribution(
        method=method,
        maps=_expand_to_pixels(values, segments),
        native=_padded_native(values, counts),
        native_kind="superpixel",
        targets=targets,
        cost=cost,
        segments=segments,
    )
