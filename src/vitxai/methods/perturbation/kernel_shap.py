"""KernelSHAP (Lundberg & Lee 2017, "A unified approach to interpreting model predictions",
NeurIPS).

Features (superpixels, or patches in token space) are switched off in coalitions drawn from the
Shapley kernel; least squares constrained to φ0 = f(∅) and Σφ = f(x) − f(∅) gives the
attributions. With all coalitions enumerated the result is the exact Shapley value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vitxai.methods.base import Attribution, BatchContext, Cost, Score, register_method
from vitxai.methods.perturbation.engine import (
    ColourBaseline,
    Space,
    check_colour_baseline,
    check_score,
    check_space,
    evaluate_coalitions,
)
from vitxai.methods.perturbation.features import feature_attribution, feature_segments
from vitxai.methods.perturbation.segmentation import (
    SegmentationParams,
    as_segmentation,
    num_segments,
)
from vitxai.methods.perturbation.tokens import TokenBaseline
from vitxai.params import check_batch_size, check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter


@dataclass(frozen=True)
class KernelShapParams:
    """Parameters of :func:`kernel_shap`.

    Attributes:
        n_samples: model evaluations per image including the two endpoints (≥ 3). When
            2^S ≤ n_samples all 2^S coalitions are evaluated instead (exact Shapley values).
        batch_size: perturbed images per forward pass (≥ 1); None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        score: what is read from the model: "probability" (target softmax) or "logit".
        baseline: colour of removed superpixels: "mean" (the model's mean colour), "black" or
            a grey in [0, 1] (pixel space).
        segmentation: see :class:`SegmentationParams` (pixel space).
        space: "pixel" (superpixels) or "token" (ViTs only: every patch is a player, masked
            at the token level), as for :class:`LimeParams`.
        token_baseline: the embedding of masked tokens, "mean" or "zero" (token space).
    """

    n_samples: int = 1000
    batch_size: int | None = None
    score: Score = "probability"
    baseline: ColourBaseline = "mean"
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"

    def __post_init__(self) -> None:
        check_range("n_samples", self.n_samples, 3, None)
        check_batch_size("batch_size", self.batch_size)
        check_score(self.score)
        check_colour_baseline(self.baseline)
        check_space(self.space, self.token_baseline)
        object.__setattr__(self, "segmentation", as_segmentation(self.segmentation))


def shapley_kernel(s: int, k: torch.Tensor) -> torch.Tensor:
    """Shapley kernel weight (S−1) / (C(S, k)·k·(S−k)) of a coalition of k of s players."""
    binom = torch.tensor([math.comb(s, j) for j in range(s + 1)], dtype=torch.float64)
    k = k.long()
    return (s - 1) / (binom[k] * k * (s - k))


def kernel_shap_coalitions(context: BatchContext, counts: torch.Tensor, n_samples: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coalitions for KernelSHAP, per image from ``context.generator(i, "kernel_shap")``.

    Row 0 is the empty coalition and row 1 the full one. When 2^S ≤ n_samples the other rows
    are all 2^S − 2 proper coalitions with their exact Shapley-kernel weights; otherwise they
    are n_samples − 2 draws from the kernel (size k ∈ 1..S−1 with probability ∝
    (S−1)/(k(S−k)), then a uniform subset of that size), each of unit weight.

    Returns:
        coalitions (B, n, S_max) bool, weights (B, n) float64 (0 on the endpoint and unused
        rows), valid (B, n) bool marking the rows to evaluate.
    """
    sizes = [2**s if 2**s <= n_samples else n_samples for s in counts.tolist()]
    b, n, s_max = len(counts), max(sizes), int(counts.max())
    z = torch.zeros(b, n, s_max, dtype=torch.bool)
    weights = torch.zeros(b, n, dtype=torch.float64)
    valid = torch.arange(n)[None] < torch.tensor(sizes)[:, None]
    for i, s in enumerate(counts.tolist()):
        z[i, 1, :s] = True
        m = sizes[i] - 2
        if m == 0:
            continue
        if 2**s <= n_samples:
            codes = torch.arange(1, 2**s - 1)
            rows = (codes[:, None] >> torch.arange(s)) & 1
            weights[i, 2:2 + m] = shapley_kernel(s, rows.sum(1))
        else:
            g = context.generator(i, "kernel_shap")
            k = torch.arange(1, s, dtype=torch.float64)
            kernel = (s - 1) / (k * (s - k))
            size = 1 + torch.multinomial(kernel, m, replacement=True, generator=g)
            # Ranks of i.i.d. uniforms are a uniform random permutation; the players ranked
            # below k form a uniform random subset of size k.
            ranks = torch.rand(m, s, generator=g).argsort(1).argsort(1)
            rows = ranks < size[:, None]
            weights[i, 2:2 + m] = 1.0
        z[i, 2:2 + m, :s] = rows.bool()
    return z, weights, valid


def constrained_shapley_fit(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                            counts: torch.Tensor) -> torch.Tensor:
    """Batched KernelSHAP regression with the endpoint constraints enforced exactly.

    Minimises Σ_i w_i (y_i − f(∅) − z_i·φ)² subject to Σφ = f(x) − f(∅) = Δ (φ0 = f(∅) is
    fixed). Writing φ = (Δ/S)·1 + ψ with ψ in the sum-zero subspace, i.e. ψ = C v with the
    centring projector C = I − 11ᵀ/S (restricted to the image's S real superpixels), turns it
    into an unconstrained least-squares problem in v; the minimum-norm solution (gelsd) gives
    the minimum-norm φ when the sampled coalitions do not determine it, and zero on padding.

    Args:
        z: (B, n, S_max) coalitions; row 0 empty, row 1 full.
        y: (B, n) scores (NaN allowed where the weight is 0).
        weights: (B, n) non-negative regression weights (0 on rows 0, 1 and unused rows).
        counts: (B,) number of real superpixels S_b.

    Returns:
        (B, S_max) float64 φ, 0 on padding; Σφ equals Δ to rounding.
    """
    b, _, s_max = z.shape
    real = (torch.arange(s_max)[None] < counts[:, None]).double()
    s = counts.double()[:, None]
    base, delta = y[:, :1], y[:, 1:2] - y[:, :1]
    uniform = delta / s * real  # (B, S_max), sums to Δ
    proj = torch.diag_embed(real) - real[:, :, None] * real[:, None, :] / s[..., None]
    zz, yy, ww = z[:, 2:].double(), y[:, 2:], weights[:, 2:]
    if zz.shape[1] == 0:  # every image has S = 1: φ = Δ
        return uniform
    residual = torch.nan_to_num(yy - base - (zz * uniform[:, None]).sum(-1))
    root = ww.sqrt()
    a = root[..., None] * (zz @ proj)
    v = torch.linalg.lstsq(a, (root * residual)[..., None], driver="gelsd").solution
    return uniform + (proj @ v)[..., 0]


@register_method(
    "kernel_shap",
    renamed={"fill": "baseline", "output": "score", "token_fill": "token_baseline"},
    params=KernelShapParams,
    family="perturbation",
    paper="Lundberg & Lee 2017, 'A unified approach to interpreting model predictions', "
          "NeurIPS",
    summary="Shapley values of superpixels by Shapley-kernel weighted least squares.",
    uses={"segments"},
    aliases=("KernelSHAP", "kernelshap"),
)
def kernel_shap(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
                params: KernelShapParams, context: BatchContext) -> Attribution:
    """KernelSHAP on superpixels (or patches): each pixel gets its feature's Shapley value.

    The natives satisfy efficiency exactly: per image Σ_features φ = f(x) − f(all removed).
    ``cost.forward`` is the evaluations per image (n_samples, or 2^S when enumerating),
    rounded up on average over the batch when images differ.
    """
    segments = feature_segments(adapter, images, context, "kernel_shap", params.space,
                                params.segmentation)
    counts = num_segments(segments)
    z, weights, valid = kernel_shap_coalitions(context, counts, params.n_samples)
    y = evaluate_coalitions(adapter, images, segments, z, targets, baseline=params.baseline,
                            score=params.score, batch_size=params.batch_size, valid=valid,
                            space=params.space, token_baseline=params.token_baseline)
    phi = constrained_shapley_fit(z, y, weights, counts)
    return feature_attribution("kernel_shap", phi, segments, counts, params.space, images,
                               targets, Cost(forward=math.ceil(int(valid.sum()) / len(counts))))
