"""GAE, the Global Attribution Evaluation (Vukadin et al. 2024, arXiv 2412.09311; reference
code ``abslrp_gae/gae/gae.py`` of davor10105/relative-absolute-magnitude-propagation).

GAE scores a relevance method on groups of four images. Notation: D(a, b) = Σ|a − b| /
(Σ|a| + Σ|b|); R = relu(r)/max (relevance clipped at 0, peak 1); N1(v) = v/Σ|v|; f is the
unmodified model; T masking steps. For each group of four images:

1. **Mosaic**: each image downsampled to H/2 × W/2 (nearest) and tiled 2×2 (top-left,
   top-right, bottom-left, bottom-right in group order).
2. **Positive**: quadrant q sampled with probability softmax_j f(mosaic)[ŷ_j]; x_p is that
   image and c = ŷ_p its class.
3. **Trajectories**, for MoRF and LeRF, t = 1…T: o_t = f(x̃_t)_c and
   g_t = N1(|x̃_t ⊙ ∇f(x̃_t)_c|) in the model's normalised input space; unless t = T, the
   masked set grows by the unmasked elements (each of the 3·H·W channel values is one element)
   with the largest (MoRF) or smallest (LeRF) g_t, so that x̃_{t+1} has ⌊(t/T)·3HW⌋ elements
   masked, i.e. set to 0 in normalised space (the model's mean colour in pixel space).
4. **Impact map** CIM = sign(Σ_channels [N1(Σ_t g_t^LeRF) − N1(Σ_t g_t^MoRF)]), (H, W).
5. **Faithfulness** F = Σ(CIM ⊙ R_p)/Σ R_p ∈ [−1, 1].
6. **Robustness**: Δr_t = D(R_p, R(x̃_t^MoRF)) − D(R_p, R(x̃_t^LeRF)) and
   Δo_t = (o_t^LeRF − o_t^MoRF)/|o_1| for t = 2…T; Rob = 1 − 2·D(Δr, Δo) ∈ [−1, 1].
7. **Local consistency** LC = relu(F + Rob)/2 ∈ [0, 1].
8. **Contrastiveness**: S_j = 2·p(y_j)/p(c) − 1 for quadrant j (p = softmax f(x_p)), the
   central 2×2 pixels set to 1; C = relu(Σ(S ⊙ R_mosaic)/Σ R_mosaic) ∈ [0, 1] with R_mosaic the
   relevance of the mosaic for class c.
9. **GAE** = LC·C ∈ [0, 1] per positive image.

Fixes of the reference code (docs/evaluation.md §7), applied unless noted:

* (a) each mosaic and its positive come from the same four consecutive images, for any batch
  size (the reference tiles images m, M+m, 2M+m, 3M+m but samples the positive from 4m…4m+3, so
  for batches above 4 the positive is usually not in its mosaic). ``legacy=True`` reproduces
  the reference's strided tiling, and its score maps.
* (b) MoRF and LeRF both have exactly ⌊((t−1)/T)·3HW⌋ elements masked at step t (the reference
  re-ranks the masked MoRF image and masks ⌊(t/T)·3HW⌋ *new* elements per step, so MoRF
  reaches fractions 0, .1, .3, .6, 1, 1, … for T = 10). ``legacy=True`` reproduces that
  schedule: ⌊min(1, t(t−1)/(2T))·3HW⌋ at step t, new elements again chosen by g_t.
* (c) one label source: every class (c and the y_j of S) is the model's prediction on the
  full-resolution image; the reference takes S's classes from the dataset labels. This holds
  in legacy mode too (the API has no labels).
* (d) relevance, CIM and S are all single-channel: (B, C, H, W) relevance is reduced by its
  channel sum before the ReLU, so a 1-channel map and the same map repeated over 3 channels
  score identically (the reference broadcasts a 1-channel map against 3-channel CIM and S).
* (e) no absolute epsilons (the reference adds 1e-9, which dominates tiny maps and outputs).
  Ratios are exact; where both sides are zero the limit is used: D(0, 0) = 0; F = C = 0 for a
  relevance without positive part; Δo is divided by |o_1| + ε·max_t|o_t| with ε the float64
  machine epsilon (a relative guard). Dividing by |o_1| rather than o_1 keeps Δo's sign meaning
  "LeRF kept more output than MoRF" for a negative initial logit (identical for o_1 > 0).

Randomness: one CPU generator seeded with ``seed`` samples all positives (no global RNG).
Masking ties (equal g) go to the lower flat index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitxai.models.adapter import ModelAdapter

RelevanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["gae", "masked_counts", "mosaic_groups"]

_EPS = torch.finfo(torch.float64).eps


def masked_counts(steps: int, n: int, *, legacy: bool = False) -> torch.Tensor:
    """Number of masked elements at steps t = 1…T for MoRF (row 0) and LeRF (row 1).

    Fixed: ⌊(t − 1)·n/T⌋ for both orders. Legacy (reference MoRF): ⌊min(1, t(t−1)/(2T))·n⌋,
    i.e. fractions 0, .1, .3, .6, 1, 1, … for T = 10; LeRF as fixed.

    Returns:
        (2, T) long.
    """
    t = torch.arange(steps)  # t − 1 masking steps done before step t
    fixed = t * n // steps
    morf = torch.clamp(t * (t + 1) * n // (2 * steps), max=n) if legacy else fixed
    return torch.stack([morf, fixed])


def mosaic_groups(labels: Sequence[int], n_groups: int, seed: int) -> list[list[int]]:
    """Draw ``n_groups`` groups of four images for :func:`gae`, classes as different as possible.

    Contrastiveness compares the explained class with the classes of the other three tiles of
    the mosaic: when all four share a class, S = 1 everywhere and C = 1 for any map. The
    reference draws its groups from a shuffled loader; taking the first images of class-sorted
    data (Imagenette val) would give one class per group.

    Each group takes its images one at a time from the class used least in the group so far;
    among those, from the class with the most images left (counted up to the number of groups
    still to draw, beyond which a class can serve every remaining group anyway); remaining
    ties at random. This gives four distinct classes in every group whenever the data allows
    it for all groups at once (Σ_c min(n_c, n_groups) ≥ 4·n_groups with n_c images of class
    c), and otherwise repeats classes as evenly as it can. Images within a class, the ties and
    the tile order within a group are drawn with ``numpy.random.default_rng(seed)``.

    Args:
        labels: the class of each candidate image (any ints; equal ints are one class).
        n_groups: groups to draw, ≥ 1, with 4·n_groups ≤ len(labels).
        seed: the same labels, count and seed give the same groups.

    Returns:
        ``n_groups`` lists of four positions into ``labels``, no position used twice; pass
        the images of all groups, concatenated in order, to :func:`gae` (which takes
        consecutive fours).

    Raises:
        ValueError: n_groups < 1 or fewer than 4·n_groups labels.
    """
    if n_groups < 1 or 4 * n_groups > len(labels):
        raise ValueError(f"need 1 ≤ n_groups ≤ {len(labels) // 4} for {len(labels)} images, "
                         f"got n_groups={n_groups}")
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for i, x in enumerate(labels):
        members.setdefault(int(x), []).append(i)
    classes = sorted(members)
    left = {c: [int(i) for i in rng.permutation(members[c])] for c in classes}
    groups = []
    for g in range(n_groups):
        to_draw = n_groups - g
        tie = dict(zip(classes, rng.random(len(classes)).tolist(), strict=True))
        used = dict.fromkeys(classes, 0)
        group = []
        for _ in range(4):
            c = min((c for c in classes if left[c]),
                    key=lambda c: (used[c], -min(len(left[c]), to_draw), tie[c]))
            used[c] += 1
            group.append(left[c].pop())
        groups.append([group[k] for k in rng.permutation(4)])
    return groups


def _n1(v: torch.Tensor) -> torch.Tensor:
    """v / Σ|v| over all but the first axis; an all-zero row stays zero."""
    s = v.abs().flatten(1).sum(1).view(-1, *[1] * (v.ndim - 1))
    return torch.where(s > 0, v / s.clamp(min=torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def _peak_one(r: torch.Tensor) -> torch.Tensor:
    """R = relu(r)/max per map (…, H, W) → same shape; no positive part → zeros."""
    r = r.clamp(min=0)
    peak = r.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, r / peak.clamp(min=torch.finfo(r.dtype).tiny),
                       torch.zeros_like(r))


def _dice_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D(a, b) = Σ|a − b| / (Σ|a| + Σ|b|) over the last axis, in [0, 1]; D(0, 0) = 0."""
    num = (a - b).abs().sum(-1)
    den = a.abs().sum(-1) + b.abs().sum(-1)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny),
                       torch.zeros_like(num))


def _overlap(weights: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Σ(w ⊙ R)/Σ R per map for peak-one R; 0 when R is all zero."""
    total = r.flatten(1).sum(1)
    num = (weights * r).flatten(1).sum(1)
    return torch.where(total > 0, num / total.clamp(min=torch.finfo(total.dtype).tiny),
                       torch.zeros_like(num))


def _mosaic(quads: torch.Tensor) -> torch.Tensor:
    """(P, 4, C, H, W) → (P, C, H, W): each image at H/2 × W/2 (nearest), tiled 2×2."""
    p, _, c, h, w = quads.shape
    small = F.interpolate(quads.reshape(p * 4, c, h, w), size=(h // 2, w // 2), mode="nearest")
    small = small.reshape(p, 2, 2, c, h // 2, w // 2)  # (P, row, col, C, h, w)
    return small.permute(0, 3, 1, 4, 2, 5).reshape(p, c, h, w)


def _relevance(relevance_fn: RelevanceFn, total: int,
               make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
               batch_size: int) -> torch.Tensor:
    """relevance_fn on ``total`` images built ``batch_size`` at a time by ``make(lo, hi)``
    → (total, H, W) float64 on the CPU, channels summed (fix d)."""
    out = []
    for lo in range(0, total, batch_size):
        x, t = make(lo, min(lo + batch_size, total))
        r = torch.as_tensor(relevance_fn(x, t)).detach()
        if r.ndim == 4:
            r = r.sum(1)
        if r.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"relevance_fn returned {tuple(r.shape)} for images "
                             f"{tuple(x.shape)}; expected (N, H, W) or (N, C, H, W)")
        out.append(r.to("cpu", torch.float64))
    return torch.cat(out)


def _logit_and_gradient(adapter: ModelAdapter, x: torch.Tensor, t: torch.Tensor,
                        batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x)_t (N,) and ∂f(x)_t/∂x (N, 3, H, W) in chunks (one backward per chunk)."""
    outs, grads = [], []
    for xc, tc in zip(x.split(batch_size), t.split(batch_size), strict=True):
        xc = xc.detach().requires_grad_(True)
        o = adapter.logits(xc).gather(1, tc[:, None])[:, 0]
        # samples are independent in eval mode, so the gradient of the sum is per-sample
        (g,) = torch.autograd.grad(o.sum(), xc)
        outs.append(o.detach())
        grads.append(g)
    return torch.cat(outs), torch.cat(grads)


def _trajectories(adapter: ModelAdapter, xp: torch.Tensor, c: torch.Tensor, steps: int,
                  legacy: bool, batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoRF and LeRF masking of the positives.

    Returns:
        masks (T, 2, P, 3·H·W) bool, the masked elements of x̃_t; outputs (2, P, T) float64
        o_t; impact (P, H, W) float64, the single-channel CIM.
    """
    p = xp.shape[0]
    n = xp[0].numel()
    mean = adapter.mean.to(xp)
    counts = masked_counts(steps, n, legacy=legacy).to(xp.device)
    x2 = xp[None].expand(2, *xp.shape).reshape(2 * p, *xp.shape[1:])  # MoRF rows, LeRF rows
    t2 = c.repeat(2)
    largest = torch.tensor([True, False], device=xp.device).repeat_interleave(p)
    masked = torch.zeros(2 * p, n, dtype=torch.bool, device=xp.device)
    g_sum = torch.zeros(2 * p, n, dtype=torch.float64, device=xp.device)
    masks, outputs = [], []
    for step in range(steps):
        xt = torch.where(masked.view_as(x2), mean, x2)
        o, grad = _logit_and_gradient(adapter, xt, t2, batch_size)
        # x̃ ⊙ ∇ in normalised space equals (x − μ) ⊙ ∇_x in pixel space (the σ factors cancel)
        g = _n1(((xt - mean) * grad).abs().flatten(1).double())
        g_sum += g
        masks.append(masked)
        outputs.append(o.double())
        if step + 1 < steps:
            # already masked elements first, then the unmasked by g (largest for MoRF rows,
            # smallest for LeRF rows), ties to the lower index: the masked set only grows
            key = torch.where(largest[:, None], -g, g)
            order = torch.argsort(key, dim=1, stable=True)
            order = torch.gather(order, 1, torch.argsort(
                (~torch.gather(masked, 1, order)).to(torch.uint8), dim=1, stable=True))
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(n, device=xp.device).expand(2 * p, n))
            k = counts[:, step + 1].repeat_interleave(p)
            masked = rank < k[:, None]
    shape = (p, *xp.shape[1:])
    diff = _n1(g_sum[p:].view(shape)) - _n1(g_sum[:p].view(shape))  # LeRF − MoRF
    impact = torch.sign(diff.sum(1)).cpu()
    return (torch.stack(masks).view(steps, 2, p, n),
            torch.stack(outputs, 1).view(2, p, steps).cpu(), impact)


def gae(
    adapter: ModelAdapter,
    relevance_fn: RelevanceFn,
    images: torch.Tensor,
    *,
    steps: int = 10,
    seed: int = 0,
    legacy: bool = False,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Global Attribution Evaluation of ``relevance_fn`` on one batch (Vukadin et al. 2024).

    See the module docstring for the definition and the fixes of the reference code.

    Args:
        adapter: the model f, used unmodified for predictions, trajectories and scores.
        relevance_fn: ``relevance_fn(images, targets) -> maps`` for (N, 3, H, W) unnormalised
            images and (N,) long targets, returning (N, H, W) or (N, C, H, W) relevance (channels
            are summed). Called on the positives, the mosaics and the 2·(T − 1) masked images of
            every positive, ``batch_size`` images at a time.
        images: (B, 3, H, W) unnormalised in [0, 1], B a positive multiple of 4, H and W even;
            images 4m…4m+3 form group m (draw the groups at random before calling, as the
            reference's shuffled loader does, e.g. with :func:`mosaic_groups`).
        steps: T ≥ 2 masking steps.
        seed: seeds the sampling of the positives.
        legacy: reproduce the reference's strided mosaics (a) and MoRF schedule (b).
        batch_size: images per model or ``relevance_fn`` call.

    Returns:
        dict of CPU tensors, one row per group (P = B/4):

        * "faithfulness" F ∈ [−1, 1], "robustness" Rob ∈ [−1, 1], "local_consistency"
          LC ∈ [0, 1], "contrastiveness" C ∈ [0, 1], "gae" ∈ [0, 1]: (P,) float64;
        * "positive": (P,) long index into ``images`` of each positive; "target": (P,) its
          predicted class c; "mosaic": (P, 4) long indices of the images tiled in each mosaic
          (TL, TR, BL, BR);
        * "masked_fraction_morf", "masked_fraction_lerf": (P, T) float64 share of the 3·H·W
          elements masked at each step (see :func:`masked_counts`);
        * "impact_map": (P, H, W) float64 CIM in {−1, 0, 1};
        * "relevance": (P, H, W) the positives' relevance, scaled to peak 1 (as scored).
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0 or b % 4:
        raise ValueError(f"GAE needs a batch that is a positive multiple of 4, got {b}")
    if h % 2 or w % 2:
        raise ValueError(f"GAE tiles half-size images; H and W must be even, got {h}×{w}")
    if steps < 2:
        raise ValueError(f"steps must be ≥ 2, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    x = images.to(adapter.device, adapter.dtype)
    p = b // 4
    arange = torch.arange(b, device=x.device)
    groups = arange.view(p, 4)
    # (a): the reference tiles images m, M+m, 2M+m, 3M+m into mosaic m
    members = arange.view(4, p).T.contiguous() if legacy else groups

    logits = adapter.predict(x, batch_size)
    pred = logits.argmax(1)  # (c): the one label source
    mosaics = _mosaic(x[members])
    mosaic_logits = adapter.predict(mosaics, batch_size)
    weights = mosaic_logits.gather(1, pred[groups]).double().softmax(1).cpu()
    q = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
    positive = groups[torch.arange(p, device=x.device), q.to(x.device)]
    xp, c = x[positive], pred[positive]

    masks, o, impact = _trajectories(adapter, xp, c, steps, legacy, batch_size)

    r_p = _peak_one(_relevance(relevance_fn, p, lambda lo, hi: (xp[lo:hi], c[lo:hi]),
                               batch_size))
    faithfulness = _overlap(impact, r_p)

    # relevance on x̃_t, t = 2…T, of both orders, rows ordered (order, positive, t); the
    # images are rebuilt from the masks per chunk
    mean = adapter.mean.to(x)
    traj_masks = masks[1:].permute(1, 2, 0, 3).reshape(-1, *x.shape[1:])
    row_positive = torch.arange(p, device=x.device).repeat_interleave(steps - 1).repeat(2)

    def trajectory(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        who = row_positive[lo:hi]
        return torch.where(traj_masks[lo:hi], mean, xp[who]), c[who]

    r_t = _peak_one(_relevance(relevance_fn, traj_masks.shape[0], trajectory, batch_size))
    r_t = r_t.view(2, p, steps - 1, h * w)
    flat_p = r_p.view(1, p, 1, h * w)
    dist = _dice_distance(flat_p, r_t)  # (2, P, T−1)
    delta_r = dist[0] - dist[1]
    scale = o[:, :, :1].abs().amax(0) + _EPS * o.abs().amax((0, 2))[:, None]
    delta_o = (o[1, :, 1:] - o[0, :, 1:]) / scale
    delta_o = torch.where(scale > 0, delta_o, torch.zeros_like(delta_o))
    robustness = 1 - 2 * _dice_distance(delta_r, delta_o)
    local = (faithfulness + robustness).clamp(min=0) / 2

    probs = logits[positive].double().softmax(1).cpu()
    labels = pred[groups].cpu()
    score = 2 * probs.gather(1, labels) / probs.gather(1, c.cpu()[:, None]) - 1  # (P, 4)
    quadrant = score.flatten()[members.cpu()]  # score of each tiled image, in tile order
    s_map = quadrant.view(p, 2, 2, 1, 1).expand(p, 2, 2, h // 2, w // 2)
    s_map = s_map.permute(0, 1, 3, 2, 4).reshape(p, h, w).clone()
    s_map[:, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = 1.0  # ambiguous centre
    r_m = _peak_one(_relevance(relevance_fn, p, lambda lo, hi: (mosaics[lo:hi], c[lo:hi]),
                               batch_size))
    contrastiveness = _overlap(s_map, r_m).clamp(min=0)

    fractions = masks.double().mean(-1).permute(1, 2, 0).cpu()  # (2, P, T)
    return {
        "faithfulness": faithfulness,
        "robustness": robustness,
        "local_consistency": local,
        "contrastiveness": contrastiveness,
        "gae": local * contrastiveness,
        "positive": positive.cpu(),
        "target": c.cpu(),
        "mosaic": members.cpu(),
        "masked_fraction_morf": fractions[0],
        "masked_fraction_lerf": fractions[1],
        "impact_map": impact,
        "relevance": r_p.view(p, h, w).cpu(),
    }
