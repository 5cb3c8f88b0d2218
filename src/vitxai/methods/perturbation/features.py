"""LIME's and KernelSHAP's features: superpixels (pixel space) or patches (token space).

Per-feature values (B, S_max) become maps here: superpixel natives (NaN-padded beyond each
image's S_b) expanded to pixels, or (B, gh, gw) patch natives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vitxai.methods.base import Attribution, BatchContext, Cost
from vitxai.methods.perturbation.engine import Space, grid_attribution
from vitxai.methods.perturbation.segmentation import SegmentationParams, shared_segments
from vitxai.methods.perturbation.tokens import token_vit

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter, ViTAdapter


def patch_segments(adapter: ViTAdapter, images: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) int64 CPU labels: patch (r, c) is feature r·gw + c (token order)."""
    gh, gw = adapter.grid_of(images)
    return torch.arange(gh * gw).view(1, gh, gw).repeat(images.shape[0], 1, 1)


def _expand_to_pixels(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, S_max) per-superpixel values → (B, H, W) maps (same dtype; attribute() casts)."""
    flat = values.gather(1, segments.flatten(1).to(values.device))
    return flat.view(segments.shape)


def _padded_native(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, S_max) values with NaN beyond each image's S_b."""
    real = torch.arange(values.shape[1])[None] < counts[:, None]
    return torch.where(real, values, torch.full_like(values, float("nan")))


def feature_segments(adapter: ModelAdapter, images: torch.Tensor, context: BatchContext,
                     method: str, space: Space, segmentation: SegmentationParams) -> torch.Tensor:
    """LIME's and KernelSHAP's features: superpixels (pixel space) or patches (token space)."""
    if space == "token":
        return patch_segments(token_vit(adapter, method), images)
    return shared_segments(context, images, segmentation)


def feature_attribution(method: str, values: torch.Tensor, segments: torch.Tensor,
                        counts: torch.Tensor, space: Space, images: torch.Tensor,
                        targets: torch.Tensor, cost: Cost) -> Attribution:
    """Wrap (B, S_max) feature values: superpixel natives, or (B, gh, gw) patch natives."""
    if space == "token":
        return grid_attribution(method, values.view(segments.shape), space, images, targets, cost)
    return Attribution(
        method=method,
        maps=_expand_to_pixels(values, segments),
        native=_padded_native(values, counts),
        native_kind="superpixel",
        targets=targets,
        cost=cost,
        segments=segments,
    )
