"""RISE (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
Black-box Models", BMVC).

Saliency = Σ_i p_c(M_i ⊙ x + (1 − M_i) ⊙ x′)·M_i / (N·p1) over random smooth masks M_i; in
token space the masks are drawn on the patch grid and blend token embeddings, or, binary,
remove the tokens they mask (``removal="drop"``). ``n_samples="auto"`` draws masks until the
map's standard error is small (:mod:`~vitxai.methods.perturbation.stopping`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from vitxai.methods.base import (
    RECORDED_WHEN_SET,
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
from vitxai.methods.perturbation.removal import Removal, check_removal, check_token_removal
from vitxai.methods.perturbation.stopping import (
    SampleCount,
    check_stopping,
    convergence_ratio,
    sample_until,
    schedule,
)
from vitxai.methods.perturbation.tokens import TokenBaseline, token_vit
from vitxai.params import check_batch_size, check_choice, check_range

#: RISE's masks: the paper's bilinear upsampling of the grid, or nearest (0/1 masks)
RiseMasks = Literal["smooth", "binary"]

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter


@dataclass(frozen=True)
class RiseParams:
    """Parameters of :func:`rise` (defaults: the paper's and IDSDS's settings).

    Attributes:
        n_samples: N, random masks per image (≥ 1); "auto": draw masks in rounds until the
            map's standard error relative to its range is below ``tolerance``, at most
            ``max_samples``.
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
        token_baseline: the embedding masked tokens blend towards, "mean" or "zero" (token space,
            ``removal="blend"``), see :func:`token_masking`.
        masks: "smooth" (the paper's: the grid upsampled bilinearly, values in [0, 1]) or
            "binary" (upsampled nearest: each pixel or token kept or not).
        removal: token space: "blend", "drop" or "attention_mask"
            (:mod:`~vitxai.methods.perturbation.removal`); the last two need
            ``masks="binary"`` (a token is in the sequence or not).
        tolerance: ``n_samples="auto"``: stop once max SE / (max − min) of the map is below
            this (> 0).
        max_samples: ``n_samples="auto"``: masks per image at most (≥ 1).
    """

    n_samples: SampleCount = 1000
    grid: int = 8
    p_keep: float = 0.1
    baseline: Baseline = "mean"
    batch_size: int | None = None
    score: Score = "probability"
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"
    masks: RiseMasks = field(default="smooth", metadata=RECORDED_WHEN_SET)
    removal: Removal = field(default="blend", metadata=RECORDED_WHEN_SET)
    tolerance: float = field(default=0.05, metadata=RECORDED_WHEN_SET)
    max_samples: int = field(default=4000, metadata=RECORDED_WHEN_SET)

    def __post_init__(self) -> None:
        check_stopping(self.n_samples, self.tolerance, self.max_samples, 1)
        check_range("grid", self.grid, 1, None)
        check_range("p_keep", self.p_keep, 0.0, 1.0, low_open=True)
        check_baseline("baseline", self.baseline)
        check_batch_size("batch_size", self.batch_size)
        check_score(self.score)
        check_space(self.space, self.token_baseline)
        check_choice("masks", self.masks, ("smooth", "binary"))
        check_removal(self.removal, self.space)
        if self.removal != "blend" and self.masks != "binary":
            raise ValueError(f"parameter removal={self.removal!r} needs masks='binary': "
                             "RISE's smooth masks blend tokens, a removed token is gone")


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
               dtype: torch.dtype, binary: bool = False) -> torch.Tensor:
    """RISE masks (M, H, W) from (M, s, s) grids and (M, 2) shifts.

    As the paper's code: bilinear upsampling of the grid to (s + 1)·ceil(H/s) (224 → 252 for
    s = 8), then a crop of H × W at the shift; smooth masks in [0, 1] of ``dtype``. torch's
    bilinear (align_corners=False) clamps at the border where the paper's
    ``skimage.transform.resize(mode="reflect")`` reflects; only the outermost half cell of the
    upsampled grid differs. ``binary``: nearest upsampling instead, bool masks.
    """
    h, w = size
    s = grids.shape[-1]
    up = F.interpolate(grids[:, None].to(dtype),
                       size=((s + 1) * math.ceil(h / s), (s + 1) * math.ceil(w / s)),
                       mode="nearest" if binary else "bilinear",
                       **({} if binary else {"align_corners": False}))[:, 0]
    rows = shifts[:, :1] + torch.arange(h, device=up.device)  # (M, H)
    cols = shifts[:, 1:] + torch.arange(w, device=up.device)  # (M, W)
    index = torch.arange(len(up), device=up.device)[:, None, None]
    crop = up[index, rows[:, :, None], cols[:, None, :]]
    return crop > 0.5 if binary else crop


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
    one by one; masks are built chunk by chunk inside the engine and accumulated there. With
    ``n_samples="auto"`` the terms t_i = y_i·M_i are i.i.d., so the map's standard error is
    their sample standard deviation / (√N·p1) (batch means with batches of one mask).
    """
    pixel = params.space == "pixel"
    if not pixel:
        check_token_removal(token_vit(adapter, "rise"), params.removal, "rise")
    size = ((images.shape[-2], images.shape[-1]) if pixel
            else token_vit(adapter, "rise").grid_of(images))
    device = images.device
    auto = params.n_samples == "auto"
    n_masks = params.max_samples if auto else params.n_samples
    grids, shifts = rise_draws(context, images.shape[0], n_masks, params.grid, params.p_keep,
                               size)
    grids, shifts = grids.to(device), shifts.to(device)
    # accumulate in at least float32 (a sum of 1000 masks in bf16 would lose the signal);
    # float64 for "auto", whose variance subtracts two large sums
    dtype = torch.float64 if auto else torch.promote_types(images.dtype, torch.float32)
    acc = torch.zeros(images.shape[0], *size, dtype=dtype, device=device)
    acc2 = torch.zeros_like(acc) if auto else None

    def masks(bi: torch.Tensor, ji: torch.Tensor) -> torch.Tensor:
        m = rise_masks(grids[bi, ji], shifts[bi, ji], size, images.dtype,
                       params.masks == "binary")
        return m[:, None] if pixel else m.flatten(1)

    def accumulate(bi: torch.Tensor, ji: torch.Tensor, keep: torch.Tensor,
                   y: torch.Tensor) -> None:
        weighted = y.to(acc.dtype).view(-1, 1, 1) * keep.view(-1, *size).to(acc.dtype)
        # rows come image by image, so per-image sums are plain (deterministic) reductions
        images_in_chunk, counts = torch.unique_consecutive(bi, return_counts=True)
        for b, part in zip(images_in_chunk.tolist(), weighted.split(counts.tolist()),
                           strict=True):
            acc[b] += part.sum(dim=0)
            if acc2 is not None:
                acc2[b] += (part**2).sum(dim=0)

    baseline = (make_baseline(adapter, images, params.baseline, context, "rise_baseline")
                if pixel else None)

    def evaluate(valid: torch.Tensor | None = None) -> None:
        evaluate_masks(adapter, images, targets, masks, n_masks, baseline=baseline,
                       space=params.space, token_baseline=params.token_baseline,
                       removal=params.removal, score=params.score,
                       batch_size=params.batch_size, valid=valid, on_chunk=accumulate)

    if not auto:
        evaluate()
        native = acc / (params.n_samples * params.p_keep)
        return grid_attribution("rise", native, params.space, images, targets,
                                Cost(forward=params.n_samples))

    def evaluate_round(active: torch.Tensor, lo: int, hi: int) -> None:
        rows = torch.zeros(images.shape[0], n_masks, dtype=torch.bool)
        rows[active, lo:hi] = True
        evaluate(rows)

    def estimate(active: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = acc[active].cpu() / n
        var = (acc2[active].cpu() / n - mean**2).clamp(min=0) * n / max(n - 1, 1)
        return mean / params.p_keep, convergence_ratio(mean, (var / n).sqrt())

    native, ratio, used = sample_until(images.shape[0], schedule(min(64, n_masks), n_masks),
                                       evaluate_round, estimate, params.tolerance)
    result = grid_attribution("rise", native.to(images.device), params.space, images, targets,
                              Cost(forward=math.ceil(int(used.sum()) / len(used))))
    result.standard_error, result.evaluations = ratio, used
    return result
