"""RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC).

Saliency = Σ_i p_c(M_i ⊙ x + (1 − M_i) ⊙ x′)·M_i / (N·p1) over random smooth masks M_i; in
token space the masks are drawn on the patch grid and blend token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vitxai.methods.base import (
    Attribution,
    Baseline,
    BatchContext,
    Cost,
    Score,
    check_baseline,
    make_baseline,
    register_method,
)
from vitxai.methods.perturbation.engine import (
    Space,
    check_score,
    check_space,
    evaluate_masks,
    grid_attribution,
)
from vitxai.methods.perturbation.tokens import TokenBaseline, token_vit
from vitxai.params import check_batch_size, check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter


@dataclass(frozen=True)
class RiseParams:
    """Parameters of :func:`rise` (defaults: the paper's and IDSDS's settings).

    Attributes:
        n_samples: N, random masks per image (≥ 1).
        grid: s, cells per side of the binary grid (≥ 1).
        p_keep: p1, probability that a grid cell is kept, in (0, 1].
        baseline: what masked pixels become (pixel space), names as in
            :func:`~vitxai.methods.base.make_baseline`: "mean" (default) = the model's mean
            colour = zero of the normalised input (IDSDS's "zeros", RISE); "uniform_normalized"
            = U(−1, 1) in normalised units drawn per image (IDSDS's RISE-U); "black", "white",
            "uniform" (U(0, 1) pixels) or a grey level.
        batch_size: masked images per forward pass (≥ 1); None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        score: what is read from the model: "probability" (the paper's softmax p_c) or
            "logit".
        space: "pixel", or "token" (ViTs only: masks are drawn on the patch grid and blend
            each token's embedding with the baseline embedding ``token_baseline``;
            ``baseline`` is then unused).
        token_baseline: the embedding masked tokens blend towards, "mean" or "zero" (token space),
            see :func:`token_masking`.
    """

    n_samples: int = 1000
    grid: int = 8
    p_keep: float = 0.1
    baseline: Baseline = "mean"
    batch_size: int | None = None
    score: Score = "probability"
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"

    def __post_init__(self) -> None:
        check_range("n_samples", self.n_samples, 1, None)
        check_range("grid", self.grid, 1, None)
        check_range("p_keep", self.p_keep, 0.0, 1.0, low_open=True)
        check_baseline("baseline", self.baseline)
        check_batch_size("batch_size", self.batch_size)
        check_score(self.score)
        check_space(self.space, self.token_baseline)


def rise_draws(context: BatchContext, n_images: int, n_samples: int, grid: int, p_keep: float,
               size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of RISE's masks, per image from ``context.generator(i, "rise")``.

    Returns:
        grids (B, N, s, s) bool, each cell kept with probability p_keep, and shifts (B, N, 2)
        long, the crop offsets (row, column), uniform in [0, ceil(H/s)) × [0, ceil(W/s)).
    """
    cell = (math.ceil(size[0] / grid), math.ceil(size[1] / grid))
    grids, shifts = [], []
    for i in range(n_images):
        g = context.generator(i, "rise")
        grids.append(torch.rand(n_samples, grid, grid, generator=g, dtype=torch.float64)
                     < p_keep)
        shifts.append(torch.stack([torch.randint(cell[0], (n_samples,), generator=g),
                                   torch.randint(cell[1], (n_samples,), generator=g)], dim=1))
    return torch.stack(grids), torch.stack(shifts)


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """Smooth RISE masks (M, H, W) in [0, 1] from (M, s, s) grids and (M, 2) shifts.

    As the paper's code: bilinear upsampling of the grid to (s + 1)·ceil(H/s) (224 → 252 for
    s = 8), then a crop of H × W at the shift. torch's bilinear (align_corners=False) clamps at
    the border where the paper's ``skimage.transform.resize(mode="reflect")`` reflects; only the
    outermost half cell of the upsampled grid differs.
    """
    h, w = size
    s = grids.shape[-1]
    up = F.interpolate(grids[:, None].to(dtype),
                       size=((s + 1) * math.ceil(h / s), (s + 1) * math.ceil(w / s)),
                       mode="bilinear", align_corners=False)[:, 0]
    rows = shifts[:, :1] + torch.arange(h, device=up.device)  # (M, H)
    cols = shifts[:, 1:] + torch.arange(w, device=up.device)  # (M, W)
    index = torch.arange(len(up), device=up.device)[:, None, None]
    return up[index, rows[:, :, None], cols[:, None, :]]


@register_method(
    "rise",
    renamed={"n_masks": "n_samples", "output": "score", "token_fill": "token_baseline"},
    params=RiseParams,
    family="perturbation",
    aliases=("RISE",),
    paper="Petsiuk, Das & Saenko 2018, 'RISE: Randomized Input Sampling for Explanation of "
          "Black-box Models', BMVC",
    summary="Score-weighted mean of random smooth masks: Σ p_c(M⊙x + (1−M)⊙x′)·M / (N·p1).",
)
def rise(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
         params: RiseParams, context: BatchContext) -> Attribution:
    """RISE saliency; (B, H, W) "pixel" natives, or (B, gh, gw) "token" natives in token space.

    Grids, shifts and the random baseline are drawn per image, so a batch equals its images
    one by one; masks are built chunk by chunk inside the engine and accumulated there.
    """
    pixel = params.space == "pixel"
    size = ((images.shape[-2], images.shape[-1]) if pixel
            else token_vit(adapter, "rise").grid_of(images))
    device = images.device
    grids, shifts = rise_draws(context, images.shape[0], params.n_samples, params.grid,
                               params.p_keep, size)
    grids, shifts = grids.to(device), shifts.to(device)
    # accumulate in at least float32 (a sum of 1000 masks in bf16 would lose the signal)
    acc = torch.zeros(images.shape[0], *size, dtype=torch.promote_types(images.dtype,
                                                                         torch.float32),
                      device=device)

    def masks(bi: torch.Tensor, ji: torch.Tensor) -> torch.Tensor:
        m = rise_masks(grids[bi, ji], shifts[bi, ji], size, images.dtype)
        return m[:, None] if pixel else m.flatten(1)

    def accumulate(bi: torch.Tensor, ji: torch.Tensor, keep: torch.Tensor,
                   y: torch.Tensor) -> None:
        weighted = y.to(acc.dtype).view(-1, 1, 1) * keep.view(-1, *size).to(acc.dtype)
        # rows come image by image, so per-image sums are plain (deterministic) reductions
        images_in_chunk, counts = torch.unique_consecutive(bi, return_counts=True)
        for b, part in zip(images_in_chunk.tolist(), weighted.split(counts.tolist()),
                           strict=True):
            acc[b] += part.sum(dim=0)

    baseline = (make_baseline(adapter, images, params.baseline, context, "rise_baseline")
                if pixel else None)
    evaluate_masks(adapter, images, targets, masks, params.n_samples, baseline=baseline,
                   space=params.space, token_baseline=params.token_baseline,
                   score=params.score, batch_size=params.batch_size, on_chunk=accumulate)
    native = acc / (params.n_samples * params.p_keep)
    return grid_attribution("rise", native, params.space, images, targets,
                            Cost(forward=params.n_samples))
