"""Faithfulness of attribution maps by perturbation: deletion/insertion curves and IDSDS.

A map is faithful when the pixels it ranks high are the ones the model's output depends on.
Every function here removes (or restores) pixels in the order a map gives and reads the model's
output for the target class on the perturbed images:

* :func:`perturbation_curve` and :func:`auc`: deletion and insertion curves (Petsiuk, Das &
  Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC),
  most- or least-relevant first (MoRF/LeRF), per pixel or per patch.
* :func:`single_deletion`: Spearman correlation between a map's 4×4 cell sums and the logit drop
  of deleting each cell; on a model fine-tuned with cell deletions this is IDSDS (Hesse,
  Schaub-Meyer & Roth 2024, "Benchmarking the Attribution Quality of Vision Models", NeurIPS
  Datasets & Benchmarks).
* :func:`incremental_deletion`: the mean target probability while ever more pixels are deleted
  (same paper), optionally re-attributing after each step.

Conventions shared by all functions:

* ``images`` are unnormalised (B, 3, H, W) in [0, 1]; the adapter normalises them.
* ``maps`` are (B, H, W), (B, 1, H, W) or (B, 3, H, W); a 3-channel map is reduced to one
  channel by summing the channels (IDSDS: "every map is summed over channels before the
  transform"), so ``Attribution.channels`` and ``Attribution.maps`` rank pixels identically.
* Rankings are deterministic: ties go to the lower flat (row-major) index, for both orders.
* The model runs in chunks of ``batch_size`` perturbed images under ``torch.inference_mode``;
  perturbed images are built per chunk, so memory is bounded by ``batch_size`` images.
* Per-image results are returned on the CPU as float64 (B,) or (B, K) tensors, ready for
  statistics; a NaN only appears where a docstring says the score is undefined.

Baselines (what a deleted pixel becomes), all stated in pixel space, see :func:`baseline_images`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from vitxai.methods.base import (
    Baseline,
    BatchContext,
    Score,
    make_baseline,
    resolve_targets,
)
from vitxai.models.adapter import ModelAdapter

# metrics' names before the one vocabulary (docs/conventions.md)
_RENAMED_BASELINES = {"zero": "mean", "uniform": "uniform_normalized"}
#: IDSDS's deletion baselines (Hesse et al. 2024) → vitxai's names (docs/evaluation.md §2)
IDSDS_BASELINES = {"zeros": "mean", "uniform": "uniform_normalized", "blur": "blur"}
Transform = Literal["raw", "abs", "relu"]
Targets = torch.Tensor | Sequence[int] | int | None

__all__ = [
    "auc",
    "average_ranks",
    "IDSDS_BASELINES",
    "baseline_images",
    "check_grid",
    "grid_cell_sums",
    "idsds_baseline",
    "incremental_deletion",
    "one_channel",
    "pearson",
    "perturbation_curve",
    "single_deletion",
    "spearman",
    "stable_ranking",
]



# ---------------------------------------------------------------------------------------------
# statistics


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1…n along the last axis, ties sharing their average rank (scipy ``rankdata``).

    Args:
        x: (B, n) real values without NaN.

    Returns:
        (B, n) float64 ranks on ``x``'s device.
    """
    b, n = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    xs = torch.gather(x, 1, order)
    starts = torch.ones_like(xs, dtype=torch.bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    group = starts.long().cumsum(1) - 1  # tie-group id of each sorted position
    position = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(b, n)
    total = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, position)
    count = torch.zeros_like(total).scatter_add_(1, group, torch.ones_like(position))
    mean_rank = torch.gather(total / count.clamp(min=1), 1, group)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair, computed in float64.

    Args:
        a, b: (B, n) with n ≥ 2.

    Returns:
        (B,) float64 in [−1, 1]; NaN where a row of ``a`` or ``b`` is constant (the correlation
        is undefined there) or contains NaN.
    """
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ per row with average ranks for ties (equal to ``scipy.stats.spearmanr``).

    Args:
        a, b: (B, n) real values.

    Returns:
        (B,) float64 in [−1, 1]; NaN where a row is constant (ρ is undefined; IDSDS drops such
        images) or contains NaN.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman needs two equal (B, n) shapes, got {a.shape} and {b.shape}")
    bad = torch.isnan(a).any(1) | torch.isnan(b).any(1)
    # NaN would scramble the tie groups of average_ranks; those rows are NaN anyway
    a = torch.nan_to_num(a.double(), nan=0.0)
    b = torch.nan_to_num(b.double(), nan=0.0)
    rho = pearson(average_ranks(a), average_ranks(b))
    return rho.masked_fill(bad, float("nan"))


# ---------------------------------------------------------------------------------------------
# maps, rankings and baselines


def one_channel(maps: torch.Tensor, transform: Transform = "raw") -> torch.Tensor:
    """A (B, H, W) map: channel sum of a (B, C, H, W) map, then ``transform``.

    ``transform`` is applied after the channel sum, as in IDSDS ("abs" = |Σ_c a_c|, not
    Σ_c |a_c|): "raw" keeps the sign, "abs" takes the magnitude, "relu" keeps the positive part.

    Raises:
        ValueError: for other shapes, an unknown transform, or NaN in the map.
    """
    maps = torch.as_tensor(maps)
    if maps.ndim == 4:
        maps = maps.sum(1)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W) or (B, C, H, W), got {tuple(maps.shape)}")
    if torch.isnan(maps).any():
        raise ValueError("maps contain NaN; a ranking of pixels is undefined")
    if transform == "raw":
        return maps
    if transform == "abs":
        return maps.abs()
    if transform == "relu":
        return maps.clamp(min=0)
    raise ValueError(f"transform must be 'raw', 'abs' or 'relu', got {transform!r}")


def stable_ranking(scores: torch.Tensor, descending: bool, first: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Order of the units of each row, ties broken by index (lowest index first).

    Args:
        scores: (B, U) unit scores.
        descending: highest score first (MoRF) when True, lowest first (LeRF) when False.
        first: optional (B, U) bool; these units come before all others (in their own score
            order). Incremental deletion uses it to keep deleted pixels deleted; it is the same
            as pinning them to ±∞, but also holds for maps that contain infinities.

    Returns:
        (B, U) long: ``ranking[b, r]`` is the unit at rank r.
    """
    order = torch.argsort(-scores if descending else scores, dim=1, stable=True)
    if first is None:
        return order
    # a second stable sort on "not first" moves the pinned units to the front, keeping both
    # groups in score order
    pinned_last = (~torch.gather(first, 1, order)).to(torch.uint8)
    return torch.gather(order, 1, torch.argsort(pinned_last, dim=1, stable=True))


def _positions(ranking: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``positions[b, u]`` is the rank of unit u."""
    ar = torch.arange(ranking.shape[1], device=ranking.device).expand_as(ranking)
    return torch.empty_like(ranking).scatter_(1, ranking, ar)


def baseline_images(adapter: ModelAdapter, images: torch.Tensor, baseline: Baseline, *,
                    seed: int = 0, image_ids: Sequence[Any] | None = None) -> torch.Tensor:
    """The (B, 3, H, W) image a fully deleted input becomes, in pixel space.

    ``baseline`` takes the names of every method's baseline (:func:`~vitxai.methods.base.
    make_baseline`): "mean" (the model's mean colour, IDSDS's "zeros"), "blur" (IDSDS),
    "uniform_normalized" (IDSDS's "uniform"), "image_mean", "black", "white", "uniform" or a
    grey level. Random ones are drawn per image from (``seed``, image id), so an image's
    baseline does not depend on its batch; ``image_ids`` default to the batch positions.
    Deprecated names (until vitxai 0.3): "zero" for "mean"; "uniform" here meant
    "uniform_normalized".
    """
    images = torch.as_tensor(images)
    if baseline in _RENAMED_BASELINES:
        new = _RENAMED_BASELINES[baseline]
        warnings.warn(f"deletion baseline {baseline!r} is deprecated; call it {new!r}",
                      FutureWarning, stacklevel=3)
        baseline = new
    context = BatchContext.for_batch(images.shape[0], seed, image_ids)
    return make_baseline(adapter, images, baseline, context, "uniform")


def idsds_baseline(name: str) -> Baseline:
    """vitxai's name of an IDSDS deletion baseline: "zeros" → "mean", "uniform" →
    "uniform_normalized", "blur" → "blur"; vitxai's own three names pass unchanged.

    Raises:
        ValueError: any other baseline (IDSDS deletes cells with these three only).
    """
    if name in IDSDS_BASELINES.values():
        return name
    if name not in IDSDS_BASELINES:
        raise ValueError(f"IDSDS deletes cells with baseline zeros, uniform or blur, not "
                         f"{name!r}")
    return IDSDS_BASELINES[name]


def check_grid(grid: int, size: Sequence[int]) -> tuple[int, int]:
    """The (ch, cw) cell of a ``grid`` × ``grid`` lattice on an image of ``size`` (H, W).

    Raises:
        ValueError: ``grid`` below 1, or cells that do not tile the image exactly.
    """
    h, w = int(size[0]), int(size[1])
    if grid < 1 or h % grid or w % grid:
        raise ValueError(f"a {grid}×{grid} grid does not tile {h}×{w} images")
    return h // grid, w // grid


def grid_cell_sums(maps: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """Sum of a (B, H, W) map over each (ch, cw) cell of a regular grid, row-major.

    Returns:
        (B, (H/ch)·(W/cw)); e.g. a 224×224 map with ``cell=(56, 56)`` gives IDSDS's 16 cells.

    Raises:
        ValueError: when the cells do not tile the map exactly.
    """
    b, h, w = maps.shape
    ch, cw = cell
    if ch < 1 or cw < 1 or h % ch or w % cw:
        raise ValueError(f"cells of {ch}×{cw} px do not tile a {h}×{w} map")
    return maps.reshape(b, h // ch, ch, w // cw, cw).sum((2, 4)).reshape(b, -1)


def _unit_masks(delete: torch.Tensor, grid: tuple[int, int], cell: tuple[int, int]
                ) -> torch.Tensor:
    """(M, U) bool over grid units → (M, 1, H, W) pixel masks."""
    m = delete.reshape(-1, 1, *grid)
    return m.repeat_interleave(cell[0], dim=2).repeat_interleave(cell[1], dim=3)


def _check_inputs(adapter: ModelAdapter, images: torch.Tensor, maps: torch.Tensor,
                  targets: Targets, transform: Transform = "raw"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    images = images.to(adapter.device, adapter.dtype)
    m = one_channel(torch.as_tensor(maps), transform).to(images.device)
    if m.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(m.shape)} do not match images {tuple(images.shape)}")
    t = resolve_targets(adapter, images, targets).to(images.device)
    return images, m, t


def _deprecated(old: str, new: str, value: Any) -> Any:
    warnings.warn(f"{old}= is deprecated; call it {new}= (docs/conventions.md)", FutureWarning,
                  stacklevel=3)
    return value


def _read(logits: torch.Tensor, targets: torch.Tensor, score: Score) -> torch.Tensor:
    if score == "probability":
        logits = logits.softmax(1)
    elif score != "logit":
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    return logits.gather(1, targets[:, None])[:, 0].double()


def _evaluate(adapter: ModelAdapter, total: int,
              make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              score: Score, batch_size: int) -> torch.Tensor:
    """The target output for ``total`` perturbed images built ``batch_size`` at a time.

    ``make(flat)`` returns the images and targets of the flat indices ``flat`` (M,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    out = []
    with torch.inference_mode():
        for lo in range(0, total, batch_size):
            flat = torch.arange(lo, min(lo + batch_size, total), device=adapter.device)
            x, t = make(flat)
            out.append(_read(adapter.logits(x), t, score))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# deletion and insertion curves


def perturbation_curve(
    adapter: ModelAdapter,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets = None,
    *,
    order: Literal["morf", "lerf"] = "morf",
    mode: Literal["deletion", "insertion"] = "deletion",
    space: Literal["pixel", "token"] | int = "pixel",
    steps: int = 20,
    baseline: Baseline = "mean",
    score: Score = "probability",
    batch_size: int = 64,
    seed: int = 0,
    image_ids: Sequence[Any] | None = None,
    unit: Literal["pixel", "patch"] | int | None = None,
    output: Score | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion or insertion curve of each map (Petsiuk et al. 2018, BMVC).

    Units (pixels or grid cells) are ranked by the map, most relevant first ("morf") or least
    relevant first ("lerf"). At step s = 0…steps the first k_s = ⌊s·U/steps⌋ of the U units are
    perturbed: *deletion* replaces them with the baseline, starting at the original image and
    ending at the baseline image; *insertion* starts at the baseline image and restores them
    from the original, ending at the original image. The endpoints are therefore exactly the
    model's output on the original image and on the baseline image (the perturbed images there
    are bit-identical to them).

    Args:
        adapter: the model.
        images: (B, 3, H, W) unnormalised, in [0, 1].
        maps: (B, H, W) or (B, C, H, W) signed maps; C channels are summed first. A unit's score
            is the sum of the map over the unit. Ties rank the lower row-major index first.
        targets: class per image; None = the model's prediction.
        order: "morf" or "lerf".
        mode: "deletion" or "insertion".
        space: the units deleted: "pixel"; "token" = the ViT's patch grid
            (``adapter.patch_size``); or an int cell size in pixels that tiles the image.
        steps: number of perturbation steps, ≥ 1 (the curve has steps + 1 points).
        baseline: see :func:`baseline_images` (default "mean", the model's mean colour).
        score: "probability" (softmax of the target) or "logit" (pre-softmax).
        batch_size: perturbed images per model call.
        seed, image_ids: seed random baselines per image (ids default to batch positions).
        unit, output: deprecated names of ``space`` ("patch" = "token") and ``score``.

    Returns:
        (curves, fractions): curves (B, steps + 1) float64 on the CPU; fractions (steps + 1,)
        float64 = k_s / U, the exact share of units perturbed, from 0 to 1 (the x axis of
        :func:`auc`). With score="probability" curves lie in [0, 1]. Lower deletion AUC and
        higher insertion AUC (MoRF) mean a more faithful map.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    images, m, t = _check_inputs(adapter, images, maps, targets)
    b, _, h, w = images.shape
    if unit is not None:
        space = _deprecated("unit", "space", "token" if unit == "patch" else unit)
    if output is not None:
        score = _deprecated("output", "score", output)
    if space == "pixel":
        cell = (1, 1)
    elif space == "token":
        if not hasattr(adapter, "patch_size"):
            raise ValueError("space='token' needs a ViT adapter; pass an int cell size instead")
        cell = tuple(adapter.patch_size)
    elif isinstance(space, int) and not isinstance(space, bool):
        cell = (space, space)
    else:
        raise ValueError(f"space must be 'pixel', 'token' or an int, got {space!r}")
    scores = grid_cell_sums(m, cell)
    grid = (h // cell[0], w // cell[1])
    n_units = scores.shape[1]
    positions = _positions(stable_ranking(scores, descending=order == "morf"))
    counts = torch.arange(steps + 1, device=images.device) * n_units // steps
    base = baseline_images(adapter, images, baseline, seed=seed, image_ids=image_ids)
    # deletion perturbs towards the baseline; insertion starts there and restores the image
    start, end = (images, base) if mode == "deletion" else (base, images)
    k = steps + 1

    def make(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bi, si = flat // k, flat % k
        perturbed = positions[bi] < counts[si][:, None]
        mask = _unit_masks(perturbed, grid, cell)
        return torch.where(mask, end[bi], start[bi]), t[bi]

    curves = _evaluate(adapter, b * k, make, score, batch_size).reshape(b, k).cpu()
    return curves, (counts.double() / n_units).cpu()


def auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Area under each curve by the trapezoid rule over the normalised x axis.

    Args:
        curves: (B, K) from :func:`perturbation_curve`.
        fractions: (K,) x positions; they are rescaled to [0, 1] (first → 0, last → 1), so the
            area is the mean height of the curve.

    Returns:
        (B,) float64; in [0, 1] for probability curves.
    """
    x = torch.as_tensor(fractions, dtype=torch.float64)
    if x.ndim != 1 or x.numel() < 2 or not x[-1] > x[0]:
        raise ValueError("fractions must be an increasing (K,) axis with K ≥ 2")
    x = (x - x[0]) / (x[-1] - x[0])
    y = torch.as_tensor(curves, dtype=torch.float64)
    return torch.trapezoid(y, x.to(y.device))


# ---------------------------------------------------------------------------------------------
# IDSDS single and incremental deletion (Hesse et al. 2024)


def single_deletion(
    adapter: ModelAdapter,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets = None,
    *,
    grid: int = 4,
    baseline: Baseline = "mean",
    transform: Transform = "raw",
    batch_size: int = 64,
    seed: int = 0,
    image_ids: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Single-deletion score (IDSDS on a model fine-tuned with cell deletions; Hesse et al.
    2024, NeurIPS D&B).

    For each of the grid × grid cells k (56-px cells for 224-px input and grid 4):
    a_k = sum of the 1-channel map over cell k, d_k = y_c(x) − y_c(x with cell k at baseline)
    with y_c the pre-softmax logit of the target. The score is Spearman's ρ between (a_k) and
    (d_k) with average ranks. One batched pass evaluates all B·(grid² + 1) images.

    Args:
        adapter, images, targets: as in :func:`perturbation_curve`; IDSDS uses the ground-truth
            labels as targets.
        maps: (B, H, W) or (B, C, H, W); channels are summed, then ``transform`` applied.
        grid: cells per side; the cells must tile the image.
        baseline: see :func:`baseline_images`; IDSDS's default "zeros" is "mean".
        transform: "raw", "abs" or "relu", applied after the channel sum (IDSDS's order).
        batch_size: images per model call.
        seed, image_ids: seed random baselines per image (ids default to batch positions).

    Returns:
        (B,) float64 ρ in [−1, 1]; NaN where the cell sums (or the drops) are constant, for
        example a constant map: ρ is undefined and IDSDS drops these images (use ``nanmean``).
    """
    images, m, t = _check_inputs(adapter, images, maps, targets, transform)
    b = images.shape[0]
    cell = check_grid(grid, images.shape[2:])
    n = grid * grid
    a = grid_cell_sums(m, cell)
    base = baseline_images(adapter, images, baseline, seed=seed, image_ids=image_ids)
    # row j = 0 is the original image, row j = k + 1 deletes cell k
    one_hot = torch.eye(n + 1, dtype=torch.bool, device=images.device)[:, 1:]

    def make(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bi, ji = flat // (n + 1), flat % (n + 1)
        mask = _unit_masks(one_hot[ji], (grid, grid), cell)
        return torch.where(mask, base[bi], images[bi]), t[bi]

    y = _evaluate(adapter, b * (n + 1), make, "logit", batch_size).reshape(b, n + 1)
    drops = y[:, :1] - y[:, 1:]
    return spearman(a.double(), drops).cpu()


def incremental_deletion(
    adapter: ModelAdapter,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: Targets = None,
    *,
    steps: int = 32,
    order: Literal["ascending", "descending"] = "ascending",
    baseline: Baseline = "mean",
    transform: Transform = "raw",
    reattribute: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    image_ids: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Incremental-deletion score (Hesse et al. 2024, NeurIPS D&B).

    Pixels are ranked by the 1-channel map (ties: lower row-major index first), lowest first
    ("ascending") or highest first ("descending"). For α_s = s/steps, s = 0…steps−1 (linspace
    without the endpoint), the first ⌊α_s·HW⌋ pixels are set to the baseline in all channels,
    and the score is the mean over the steps of the target's softmax probability.

    With ``reattribute``, the map is recomputed on the current image before each step (the
    given ``maps`` serve for the unperturbed image, so it is called steps − 2 times) and the
    already deleted pixels are ranked first, as IDSDS pins them to ∓∞: the deleted set only
    grows. Without it all B·steps images are evaluated in batched calls; with it each step's B
    images are (the steps depend on each other).

    Args:
        adapter, images, targets: as in :func:`perturbation_curve`.
        maps: (B, H, W) or (B, C, H, W); channels summed, then ``transform``.
        steps: number of deletion steps, ≥ 1 (IDSDS: 32).
        order: "ascending" (least relevant deleted first; higher score = more faithful) or
            "descending" (most relevant first; lower score = more faithful).
        baseline: see :func:`baseline_images`.
        transform: "raw", "abs" or "relu" after the channel sum; also applied to the maps
            ``reattribute`` returns.
        reattribute: ``reattribute(images_now) -> maps`` for the (B, 3, H, W) current images
            (targets are the caller's to close over).
        batch_size: images per model call.
        seed, image_ids: seed random baselines per image (ids default to batch positions).

    Returns:
        (B,) float64 mean probability in [0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if order not in ("ascending", "descending"):
        raise ValueError(f"order must be 'ascending' or 'descending', got {order!r}")
    images, m, t = _check_inputs(adapter, images, maps, targets, transform)
    b, _, h, w = images.shape
    n_pix = h * w
    descending = order == "descending"
    counts = torch.arange(steps, device=images.device) * n_pix // steps
    base = baseline_images(adapter, images, baseline, seed=seed, image_ids=image_ids)

    if reattribute is None:
        positions = _positions(stable_ranking(m.reshape(b, -1), descending))

        def make(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bi, si = flat // steps, flat % steps
            mask = (positions[bi] < counts[si][:, None]).reshape(-1, 1, h, w)
            return torch.where(mask, base[bi], images[bi]), t[bi]

        probs = _evaluate(adapter, b * steps, make, "probability", batch_size)
        return probs.reshape(b, steps).mean(1).cpu()

    deleted = torch.zeros(b, n_pix, dtype=torch.bool, device=images.device)
    current = images
    scores = m.reshape(b, -1)
    probs = []
    for s in range(steps):
        if s > 0:
            if s > 1:
                new = torch.as_tensor(reattribute(current.clone()))
                scores = one_channel(new, transform).to(images.device).reshape(b, -1)
            ranking = stable_ranking(scores, descending, first=deleted)
            deleted = _positions(ranking) < counts[s]
            current = torch.where(deleted.reshape(b, 1, h, w), base, images)
        probs.append(_evaluate(adapter, b, lambda f, x=current: (x[f], t[f]), "probability",
                               batch_size))
    return torch.stack(probs, 1).mean(1).cpu()
