"""LIME (Ribeiro et al. 2016, "Why should I trust you?", KDD), as ``lime_image`` 0.2.0.1.

LIME explains a prediction by switching features (superpixels, or patches in token space) off,
evaluating the model on many such coalitions, and fitting a linear model of the target score on
the binary "kept" indicators: Bernoulli(0.5) coalitions, cosine-distance exponential kernel,
weighted ridge regression.
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
class LimeParams:
    """Parameters of :func:`lime` (defaults as lime_image 0.2.0.1's ``explain_instance``).

    Attributes:
        n_samples: coalitions per image (≥ 2), the first being the unperturbed image.
        batch_size: perturbed images per forward pass (≥ 1); None: 16 on a CPU, 64 on an
            accelerator (:func:`vitxai.batching.default_batch_size`).
        kernel_width: width of the exponential kernel on cosine distance (> 0).
        alpha: ridge penalty (≥ 0; 0 = ordinary weighted least squares).
        score: what is read from the model: "probability" (target softmax) or "logit".
        baseline: colour of removed superpixels: "mean" (the model's mean colour), "black" or
            a grey in [0, 1] (pixel space).
        segmentation: see :class:`SegmentationParams` (pixel space).
        space: "pixel" (superpixels set to ``baseline``) or "token" (ViTs only: every patch
            is a feature and removed patches are masked at the token level).
        token_baseline: the embedding of masked tokens, "mean" or "zero" (token space), see
            :func:`token_masking`.
    """

    n_samples: int = 1000
    batch_size: int | None = None
    kernel_width: float = 0.25
    alpha: float = 1.0
    score: Score = "probability"
    baseline: ColourBaseline = "mean"
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"

    def __post_init__(self) -> None:
        check_range("n_samples", self.n_samples, 2, None)
        check_batch_size("batch_size", self.batch_size)
        check_range("kernel_width", self.kernel_width, 0, None, low_open=True)
        check_range("alpha", self.alpha, 0, None)
        check_score(self.score)
        check_colour_baseline(self.baseline)
        check_space(self.space, self.token_baseline)
        object.__setattr__(self, "segmentation", as_segmentation(self.segmentation))


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched weighted ridge regression with an unpenalised intercept.

    Computes what ``sklearn.linear_model.Ridge(alpha, fit_intercept=True).fit(X, y,
    sample_weight=w)`` does: centre X and y on their w-weighted means, then minimise
    Σ w_i (y_i − x_i·β)² + α‖β‖². It is solved as the least-squares problem
    [√w·Xc; √α·I] β ≈ [√w·yc; 0] (one code path for α = 0 and α > 0, and better conditioned
    than the normal equations); the minimum-norm solution gives β_j = 0 for all-zero (padding)
    columns, also when α = 0.

    Args:
        x: (B, n, p) design matrices. y: (B, n) targets. w: (B, n) non-negative weights.
        alpha: ridge penalty ≥ 0.

    Returns:
        coef (B, p) and intercept (B,), float64.
    """
    x, y, w = x.double(), y.double(), w.double()
    total = w.sum(1, keepdim=True)
    x_mean = (w[..., None] * x).sum(1, keepdim=True) / total[..., None]
    y_mean = (w * y).sum(1, keepdim=True) / total
    root = w.sqrt()
    a = root[..., None] * (x - x_mean)
    rhs = root * (y - y_mean)
    if alpha > 0:
        p = x.shape[-1]
        eye = math.sqrt(alpha) * torch.eye(p, dtype=x.dtype).expand(x.shape[0], p, p)
        a = torch.cat([a, eye], dim=1)
        rhs = torch.cat([rhs, rhs.new_zeros(x.shape[0], p)], dim=1)
    coef = torch.linalg.lstsq(a, rhs[..., None], driver="gelsd").solution[..., 0]
    intercept = y_mean[:, 0] - (x_mean[:, 0] * coef).sum(-1)
    return coef, intercept


def lime_coalitions(context: BatchContext, counts: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(B, n_samples, S_max) bool: Bernoulli(0.5) rows, the first all ones, padding False.

    Drawn per image from ``context.generator(i, "lime")``, so each image's coalitions do not
    depend on the rest of the batch.
    """
    s_max = int(counts.max())
    z = torch.zeros(len(counts), n_samples, s_max, dtype=torch.bool)
    for i, s in enumerate(counts.tolist()):
        g = context.generator(i, "lime")
        z[i, :, :s] = torch.randint(0, 2, (n_samples, s), generator=g).bool()
        z[i, 0, :s] = True
    return z


def lime_weights(coalitions: torch.Tensor, counts: torch.Tensor,
                 kernel_width: float) -> torch.Tensor:
    """(B, n) float64 sample weights √exp(−d²/width²), d = cosine distance to the all-ones row.

    With k of S superpixels kept, d = 1 − k/(√k·√S) = 1 − √(k/S) (1 for k = 0, as sklearn's
    cosine distance treats a zero vector), which is what lime computes with
    ``pairwise_distances(..., metric="cosine")``.
    """
    kept = coalitions.sum(-1).double()
    d = 1 - (kept / counts[:, None].double()).sqrt()
    return torch.exp(-(d**2) / kernel_width**2).sqrt()


@register_method(
    "lime",
    renamed={"fill": "baseline", "output": "score", "token_fill": "token_baseline"},
    params=LimeParams,
    family="perturbation",
    paper="Ribeiro et al. 2016, 'Why should I trust you?', KDD",
    summary="Weighted ridge regression of the target score on random superpixel coalitions.",
    uses={"segments"},
    aliases=("LIME",),
)
def lime(adapter: ModelAdapter, images: torch.Tensor, targets: torch.Tensor,
         params: LimeParams, context: BatchContext) -> Attribution:
    """LIME on superpixels (or patches): each pixel gets its feature's ridge coefficient.

    Every feature is kept (lime_image keeps them all with ``num_features=100000``), so no
    feature selection is done. ``native`` holds the (B, S_max) NaN-padded superpixel
    coefficients, or the (B, gh, gw) patch coefficients in token space.
    """
    segments = feature_segments(adapter, images, context, "lime", params.space,
                                params.segmentation)
    counts = num_segments(segments)
    z = lime_coalitions(context, counts, params.n_samples)
    y = evaluate_coalitions(adapter, images, segments, z, targets, baseline=params.baseline,
                            score=params.score, batch_size=params.batch_size,
                            space=params.space, token_baseline=params.token_baseline)
    w = lime_weights(z, counts, params.kernel_width)
    coef, _ = weighted_ridge(z.double(), y, w, params.alpha)
    return feature_attribution("lime", coef, segments, counts, params.space, images, targets,
                               Cost(forward=params.n_samples))
