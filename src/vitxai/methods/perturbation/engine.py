"""The perturbation engine: the model's target score on many masked copies of each image.

Every perturbation method evaluates the model through :func:`evaluate_masks` (chunked, batched,
under ``inference_mode``, memory bounded by ``batch_size`` images). A mask says what is kept; the
rest is either replaced by a baseline in pixel space (``space="pixel"``: a colour or baseline
image) or, for ViTs, at the token level (``space="token"``: blended towards a baseline
embedding, :func:`token_masking`, or removed, :mod:`~vitxai.methods.perturbation.removal`).
:func:`evaluate_coalitions` turns feature coalitions into such masks (LIME, KernelSHAP).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch

from vitxai.batching import AdaptiveBatch, default_batch_size, run_chunked
from vitxai.methods.base import SCORES, Attribution, Cost, Score
from vitxai.methods.perturbation.removal import Removal, removal_logits, token_embeddings
from vitxai.methods.perturbation.tokens import TokenBaseline, patch_map, token_masking
from vitxai.params import check_choice, check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter

#: a constant colour that removed pixels become: the model's mean colour, black or a grey level
ColourBaseline = Literal["mean", "black"] | float
Space = Literal["pixel", "token"]
# masks(bi, ji) → keep masks of one chunk of (image, row) pairs, see evaluate_masks
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_colour_baseline(baseline: Any) -> None:
    """Raise a one-line ValueError unless ``baseline`` is a :data:`ColourBaseline`."""
    if isinstance(baseline, str):
        check_choice("baseline", baseline, ("mean", "black"))
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        check_range("baseline", float(baseline), 0.0, 1.0)
    else:
        raise ValueError(
            f"parameter baseline={baseline!r} must be 'mean', 'black' or a grey in [0, 1]"
        )


def check_score(score: Any) -> None:
    check_choice("score", score, SCORES)


def check_space(space: Any, token_baseline: Any) -> None:
    check_choice("space", space, ("pixel", "token"))
    check_choice("token_baseline", token_baseline, ("mean", "zero"))


def baseline_colour(adapter: ModelAdapter, baseline: ColourBaseline) -> torch.Tensor:
    """The pixel-space colour (1, 3, 1, 1) that replaces switched-off superpixels.

    "mean" is the model's mean colour, the zero of its normalised space (what the original
    comparison filled with; as "mean" of :func:`~vitxai.methods.base.make_baseline`);
    "black" is 0; a float is a grey level in [0, 1].
    """
    if baseline == "mean":
        return adapter.mean
    value = 0.0 if baseline == "black" else float(baseline)
    return torch.full((1, 3, 1, 1), value, dtype=adapter.dtype, device=adapter.device)


def evaluate_masks(
    adapter: ModelAdapter,
    images: torch.Tensor,
    targets: torch.Tensor,
    masks: MaskFn,
    n: int,
    *,
    baseline: torch.Tensor | None = None,
    space: Space = "pixel",
    token_baseline: TokenBaseline = "mean",
    removal: Removal = "blend",
    score: Score = "probability",
    batch_size: int | None = None,
    valid: torch.Tensor | None = None,
    on_chunk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    | None = None,
    batcher: AdaptiveBatch | None = None,
) -> torch.Tensor:
    """The model's target score on n masked copies of every image (the perturbation engine).

    Rows (image b, copy j) are evaluated in chunks of ``batch_size``; ``masks`` builds only the
    chunk's masks, so memory is bounded by ``batch_size`` images whatever B·n is. A chunk that
    runs out of memory is retried at half the size, which is then kept for the rest of the
    call (:func:`vitxai.batching.run_chunked`).

    Args:
        adapter: the model (a ViT adapter when ``space="token"``).
        images: (B, 3, H, W) unnormalised [0, 1] images on the adapter's device.
        targets: (B,) long, the class whose score is read.
        masks: ``masks(bi, ji)`` for (M,) image and copy indices (on the images' device)
            returns the keep masks: (M, 1, H, W) in pixel space, (M, gh·gw) in token space;
            bool (kept values stay bit-identical) or float in [0, 1] (a blend).
        n: copies per image.
        baseline: pixel space only: what masked pixels become, (1 or B, 3, 1 or H, 1 or W)
            pixel values; the masked input is M ⊙ x + (1 − M) ⊙ baseline.
        space: "pixel" or "token" (see :func:`token_masking`).
        token_baseline: token space only, see :func:`token_masking` (``removal="blend"``).
        removal: token space only: "blend" (masked tokens become the baseline embedding),
            "drop" (they leave the sequence; rows are evaluated sorted by how many patches
            they keep, so a chunk's rows nearly share one length, :func:`sort_by_kept`, in
            chunks of ``batch_size`` full sequences' worth of tokens, :func:`token_chunk_end`)
            or "attention_mask" (no token attends to them); see
            :mod:`vitxai.methods.perturbation.removal`. The last two need bool masks.
        score: "probability" (softmax of the target) or "logit".
        batch_size: images per forward pass; None: :func:`~vitxai.batching.default_batch_size`.
        valid: optional (B, n) bool; rows that are False are not evaluated (used when images
            of one batch need different numbers of copies).
        on_chunk: optional ``on_chunk(bi, ji, keep, y)`` called after each chunk with its
            masks and (M,) float64 scores on the device (RISE accumulates its saliency here,
            so masks are built once).
        batcher: optional :class:`~vitxai.batching.AdaptiveBatch` to use instead of a fresh
            one of ``batch_size`` (then ``batch_size`` is ignored); read its ``size`` afterwards
            for the batch size the call settled on.

    Returns:
        (B, n) float64 CPU scores; NaN where ``valid`` is False.
    """
    if space == "pixel" and baseline is None:
        raise ValueError("evaluate_masks needs a baseline in pixel space")
    b = images.shape[0]
    device = images.device
    if batch_size is None:
        batch_size = default_batch_size(device)
    tgt = targets.to(device)
    rows = (torch.ones(b, n, dtype=torch.bool) if valid is None else valid.cpu()).nonzero()
    result = torch.full((b, n), float("nan"), dtype=torch.float64)
    size = (images.shape[-2], images.shape[-1])
    blend = space == "token" and removal == "blend"
    masking = token_masking(adapter, size, token_baseline) if blend else nullcontext(None)

    def evaluate_rows(group: torch.Tensor) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
        def evaluate(lo: int, hi: int) -> tuple[torch.Tensor, ...]:
            chunk = group[lo:hi]
            bi, ji = chunk[:, 0].to(device), chunk[:, 1].to(device)
            keep = masks(bi, ji)
            if removal != "blend":
                if keep.dtype != torch.bool:
                    raise ValueError(f"removal={removal!r} needs binary (bool) masks")
                logits = removal_logits(adapter, embedded, keep, removal, bi)
            elif tokens is not None:
                tokens.keep = keep
                logits = adapter.logits(images[bi])
            else:
                base = baseline[bi] if baseline.shape[0] > 1 else baseline
                # where() for binary masks so that kept pixels are bit-identical to the input
                x = (torch.where(keep, images[bi], base) if keep.dtype == torch.bool
                     else keep * images[bi] + (1 - keep) * base)
                logits = adapter.logits(x)
            # Upcast before the softmax: half-precision probabilities near 0 or 1 lose digits.
            logits = logits.double()
            if score == "probability":
                logits = logits.softmax(dim=1)
            return chunk, bi, ji, keep, logits.gather(1, tgt[bi, None])[:, 0]
        return evaluate

    def store(_lo: int, _hi: int, out: tuple[torch.Tensor, ...]) -> None:
        # side effects outside the out-of-memory retry, so a retried chunk counts once
        chunk, bi, ji, keep, y = out
        result[chunk[:, 0], chunk[:, 1]] = y.cpu()
        if on_chunk is not None:
            on_chunk(bi, ji, keep, y)

    batcher = batcher or AdaptiveBatch(batch_size)
    with torch.inference_mode(), masking as tokens:
        # each image embedded once: a coalition's rows gather their kept tokens from it
        embedded = token_embeddings(adapter, images) if removal != "blend" else None
        if removal != "drop":
            run_chunked(evaluate_rows(rows), len(rows), batch_size, consume=store,
                        batcher=batcher)
            return result
        # Rows sorted by kept count, in chunks of about batcher.size full sequences' worth of
        # tokens: short sequences go many to a forward, so a forward's fixed costs are shared
        # (attention pooling would read the padding of unequal rows: one count per chunk).
        rows, kept = sort_by_kept(rows, masks, device)
        gh, gw = adapter.grid_of(images)
        full = adapter.num_prefix_tokens + gh * gw
        pooled = getattr(adapter.model, "attn_pool", None) is not None
        lo = 0
        while lo < len(rows):
            hi = token_chunk_end(kept, lo, batcher.size * full, adapter.num_prefix_tokens,
                                 same_count=pooled)
            chunk = AdaptiveBatch(hi - lo)
            chunk.run(evaluate_rows(rows[lo:hi]), hi - lo, consume=store)
            if chunk.backoffs:  # out of memory: a smaller token budget from now on
                batcher.size = max(1, batcher.size * chunk.size // chunk.initial)
                batcher.backoffs += chunk.backoffs
            lo = hi
    return result


def sort_by_kept(rows: torch.Tensor, masks: MaskFn, device: torch.device,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (R, 2) sorted by how many patches their token masks keep, and those counts
    (R,) long, ascending.

    Token-space masks are small ((M, gh·gw) bool), so they are built once here to count, and
    again per evaluated chunk. The sort is stable: rows of one count stay image by image,
    in order (RISE accumulates per image over consecutive rows).
    """
    if not len(rows):
        return rows, torch.zeros(0, dtype=torch.long)
    counts = torch.cat([masks(part[:, 0].to(device), part[:, 1].to(device)).sum(1).cpu()
                        for part in rows.split(chunk)])
    counts, order = torch.sort(counts, stable=True)
    return rows[order], counts


#: a chunk of token-drop rows pads every row to its longest: at most this many times the
#: shortest row's length (sorted counts spread out where few rows share a count)
MAX_PADDING = 1.25


def token_chunk_end(kept: torch.Tensor, lo: int, budget: int, prefix: int,
                    same_count: bool = False) -> int:
    """End of the chunk of rows sorted by kept count that starts at ``lo``: the most rows
    whose padded size, rows × (prefix + the chunk's largest count), stays within ``budget``
    tokens and whose longest row is at most :data:`MAX_PADDING` × the first one's length (at
    least one row); with ``same_count`` it also stops where the count changes."""
    stop = min(len(kept), lo + budget // max(prefix, 1) + 1)  # rows of ≥ prefix tokens each
    ends = torch.arange(lo + 1, stop + 1)
    width = prefix + kept[lo:stop]
    fits = ((ends - lo) * width <= budget) & (width <= MAX_PADDING * width[0])
    if same_count:
        fits &= kept[lo:stop] == kept[lo]
    return lo + max(1, int(fits.long().cumprod(0).sum()))  # the leading run that fits


def evaluate_coalitions(
    adapter: ModelAdapter,
    images: torch.Tensor,
    segments: torch.Tensor,
    coalitions: torch.Tensor,
    targets: torch.Tensor,
    *,
    baseline: ColourBaseline = "mean",
    score: Score = "probability",
    batch_size: int | None = None,
    valid: torch.Tensor | None = None,
    space: Space = "pixel",
    token_baseline: TokenBaseline = "mean",
    removal: Removal = "blend",
) -> torch.Tensor:
    """The model's target score on every coalition of every image (:func:`evaluate_masks`).

    A chunk's masks are a vectorised gather of its coalitions over the segment map.

    Args:
        adapter: the model.
        images: (B, 3, H, W) unnormalised [0, 1] images on the adapter's device.
        segments: pixel space: (B, H, W) int64 labels in [0, S_b); token space: (B, gh, gw)
            labels of the patches (see :func:`patch_segments`).
        coalitions: (B, n, S_max) bool (or 0/1); 1 keeps the feature, 0 removes it.
        targets: (B,) long, the class whose score is read.
        baseline: pixel space: colour of removed superpixels, see :func:`baseline_colour`.
        score: "probability" (softmax of the target) or "logit".
        batch_size: images per forward pass; None: :func:`~vitxai.batching.default_batch_size`.
        valid: optional (B, n) bool; rows that are False are not evaluated.
        space, token_baseline, removal: see :func:`evaluate_masks`.

    Returns:
        (B, n) float64 CPU scores; NaN where ``valid`` is False.
    """
    device = images.device
    seg = segments.to(device).flatten(1)
    keep_rows = coalitions.to(device, torch.bool)

    def masks(bi: torch.Tensor, ji: torch.Tensor) -> torch.Tensor:
        keep = keep_rows[bi, ji].gather(1, seg[bi])
        return keep.view(-1, 1, *images.shape[-2:]) if space == "pixel" else keep

    colour = (baseline_colour(adapter, baseline).to(device, images.dtype) if space == "pixel"
              else None)
    return evaluate_masks(adapter, images, targets, masks, coalitions.shape[1], baseline=colour,
                          space=space, token_baseline=token_baseline, removal=removal,
                          score=score, batch_size=batch_size, valid=valid)


def grid_attribution(method: str, native: torch.Tensor, space: Space, images: torch.Tensor,
                     targets: torch.Tensor, cost: Cost) -> Attribution:
    """Wrap a map on the pixel grid ((B, H, W) "pixel" natives, ``space="pixel"``) or on the
    patch grid ((B, gh, gw) "token" natives, upsampled by :func:`patch_map`)."""
    if space == "pixel":
        return Attribution(method, native, native, "pixel", targets, cost)
    return Attribution(method, patch_map(native, images), native, "token", targets, cost)
