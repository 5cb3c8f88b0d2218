"""Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
ECCV).

A pixel's attribution is the mean, over the sliding windows covering it, of
f(x) − f(x with the window set to the baseline); in token space the window slides over the
patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vitxai.methods.base import (
    RECORDED_WHEN_SET,
    Attribution,
    BatchContext,
    Cost,
    Score,
    register_method,
)
from vitxai.methods.perturbation.engine import (
    ColourBaseline,
    Space,
    baseline_colour,
    check_colour_baseline,
    check_score,
    check_space,
    evaluate_masks,
    grid_attribution,
)
from vitxai.methods.perturbation.removal import Removal, check_removal, check_token_removal
from vitxai.methods.perturbation.tokens import TokenBaseline, token_vit
from vitxai.params import check_batch_size, check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter


@dataclass(frozen=True)
class OcclusionParams:
    """Parameters of :func:`occlusion`.

    Attributes:
        window: side of the square occluding window in pixels (≥ 1; clipped to the image).
        stride: step between windows in pixels (≥ 1). A last window flush with the right and
            bottom border is added when the stride does not land there, so every pixel is
            covered.
        baseline: colour of the occluded window: "mean" (the model's mean colour), "black" or
            a grey in [0, 1] (pixel space).
        batch_size: occluded images per forward pass (≥ 1); None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        score: what is read from the model: "probability" (target softmax) or "logit".
        space: "pixel", or "token" (ViTs only: the window slides over the patch grid and
            occluded patches are masked at the token level; window and stride are snapped to
            the grid, the window up to whole patches and the stride down to at least one
            patch, so (16, 8) on 16-pixel patches is a one-patch window with a one-patch step).
        token_baseline: the embedding of occluded tokens, "mean" or "zero" (token space,
            ``removal="blend"``).
        removal: token space: "blend" (occluded tokens become ``token_baseline``), "drop"
            (removed from the sequence) or "attention_mask"
            (:mod:`~vitxai.methods.perturbation.removal`).
    """

    window: int = 16
    stride: int = 8
    baseline: ColourBaseline = "mean"
    batch_size: int | None = None
    score: Score = "probability"
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"
    removal: Removal = field(default="blend", metadata=RECORDED_WHEN_SET)

    def __post_init__(self) -> None:
        check_range("window", self.window, 1, None)
        check_range("stride", self.stride, 1, None)
        check_colour_baseline(self.baseline)
        check_batch_size("batch_size", self.batch_size)
        check_score(self.score)
        check_space(self.space, self.token_baseline)
        check_removal(self.removal, self.space)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: 0, stride, … plus a last flush window."""
    window = min(window, size)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _window_indicators(size: int, window: int, stride: int, device: torch.device
                       ) -> torch.Tensor:
    """(n_windows, size) bool: which positions each window along one axis covers."""
    starts = torch.tensor(window_starts(size, window, stride), device=device)
    pos = torch.arange(size, device=device)
    return (pos >= starts[:, None]) & (pos < starts[:, None] + min(window, size))


@register_method(
    "occlusion",
    renamed={"fill": "baseline", "output": "score", "token_fill": "token_baseline"},
    params=OcclusionParams,
    family="perturbation",
    aliases=("Occlusion",),
    paper="Zeiler & Fergus 2014, 'Visualizing and Understanding Convolutional Networks', ECCV",
    summary="Mean drop of the target score when sliding windows covering a pixel are removed.",
)
def occlusion(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
              params: OcclusionParams, context: BatchContext) -> Attribution:
    """Occlusion map; (B, H, W) "pixel" natives, or (B, gh, gw) "token" natives in token space.

    Row 0 of each image is the unoccluded input (f(x)), rows 1.. one window each; a pixel's
    value is the mean of f(x) − f(x with window removed) over the windows that cover it.
    Deterministic, so ``context`` is unused.
    """
    pixel = params.space == "pixel"
    device = images.device
    if pixel:
        size = (images.shape[-2], images.shape[-1])
        window, stride = (params.window,) * 2, (params.stride,) * 2
    else:
        vit = token_vit(adapter, "occlusion")
        check_token_removal(vit, params.removal, "occlusion")
        size = vit.grid_of(images)
        window = tuple(math.ceil(params.window / q) for q in vit.patch_size)
        stride = tuple(max(1, params.stride // q) for q in vit.patch_size)
    rows = _window_indicators(size[0], window[0], stride[0], device)  # (nr, h)
    cols = _window_indicators(size[1], window[1], stride[1], device)  # (nc, w)
    nr, nc = len(rows), len(cols)

    def masks(bi: torch.Tensor, ji: torch.Tensor) -> torch.Tensor:
        w = (ji - 1).clamp(min=0)
        hole = rows[w // nc][:, :, None] & cols[w % nc][:, None, :] & (ji > 0).view(-1, 1, 1)
        return ~hole[:, None] if pixel else ~hole.flatten(1)

    colour = baseline_colour(adapter, params.baseline).to(device, images.dtype) if pixel else None
    y = evaluate_masks(adapter, images, targets, masks, 1 + nr * nc, baseline=colour,
                       space=params.space, token_baseline=params.token_baseline,
                       removal=params.removal, score=params.score,
                       batch_size=params.batch_size)
    drop = (y[:, :1] - y[:, 1:]).view(-1, nr, nc)
    r, c = rows.cpu().double(), cols.cpu().double()
    # windows form a product grid: Σ over covering windows = Rᵀ·D·C, their count = (Rᵀ1)(Cᵀ1)
    total = torch.einsum("rh,brc,cw->bhw", r, drop, c)
    native = total / (r.sum(0)[:, None] * c.sum(0)[None, :])
    return grid_attribution("occlusion", native, params.space, images, targets,
                            Cost(forward=1 + nr * nc))
