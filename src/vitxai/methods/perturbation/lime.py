"""LIME (Ribeiro et al. 2016, "Why should I trust you?", KDD), as ``lime_image`` 0.2.0.1.

LIME explains a prediction by switching features (superpixels, or patches in token space) off,
evaluating the model on many such coalitions, and fitting a linear model of the target score on
the binary "kept" indicators: Bernoulli(0.5) coalitions, cosine-distance exponential kernel,
weighted ridge regression. ``paired=True`` draws the coalitions in complementary pairs
(z, 1 − z), antithetic variates (Hammersley & Morton 1956, "A new Monte Carlo technique:
antithetic variates", Proc. Cambridge Philos. Soc.) as Covert & Lee 2021 use them for
KernelSHAP: every row is still a Bernoulli(0.5) draw, so the fit estimates the same
regression, with about half the variance on real models (docs/methods.md).
``sampling="orthogonal"`` takes the rows from randomised orthogonal arrays instead of
independent draws (:func:`orthogonal_rows`): every row is still Bernoulli(0.5), and every
few columns are balanced exactly: about 1.3× fewer evaluations for the same error on the
bundled model (docs/methods.md).
``surrogate="logistic"`` adds the regression coefficients of a logistic fit to the samples
(computed on many coalitions without the model) to those of the residual (regression
adjustment, :mod:`~vitxai.methods.perturbation.surrogate`): 2.2× fewer evaluations for the
same error on the bundled benchmark's probabilities (docs/methods.md).
``n_samples="auto"`` samples until the estimated standard error of the coefficients is small
(:mod:`~vitxai.methods.perturbation.stopping`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

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
    check_colour_baseline,
    check_score,
    check_space,
    evaluate_coalitions,
)
from vitxai.methods.perturbation.features import (
    check_feature_grid,
    feature_areas,
    feature_attribution,
    feature_segments,
)
from vitxai.methods.perturbation.removal import Removal, check_removal, check_token_removal
from vitxai.methods.perturbation.segmentation import (
    SegmentationParams,
    as_segmentation,
    num_segments,
)
from vitxai.methods.perturbation.stopping import (
    SampleCount,
    check_stopping,
    convergence_ratio,
    sample_until,
    sandwich_standard_error,
    schedule,
    unit_count,
)
from vitxai.methods.perturbation.surrogate import (
    Surrogate,
    check_surrogate,
    fit_logistic,
)
from vitxai.methods.perturbation.tokens import TokenBaseline, token_vit
from vitxai.params import check_batch_size, check_choice, check_range

if TYPE_CHECKING:
    from vitxai.models.adapter import ModelAdapter

#: how LIME's Bernoulli(0.5) coalitions are drawn: independently, or as the rows of
#: randomised orthogonal arrays (:func:`orthogonal_rows`)
LimeSampling = Literal["bernoulli", "orthogonal"]
#: fresh coalitions on which :func:`adjusted_ridge` fits the surrogate's coefficients: their
#: Monte Carlo error is about a sixth of the samples' at a few hundred samples, and adds under
#: 2 % to the total error
POPULATION_ROWS = 20_000


@dataclass(frozen=True)
class LimeParams:
    """Parameters of :func:`lime` (defaults as lime_image 0.2.0.1's ``explain_instance``).

    Attributes:
        n_samples: coalitions per image (≥ 2), the first being the unperturbed image; "auto":
            sample in rounds until the coefficients' estimated standard error relative to
            their range is below ``tolerance``, at most ``max_samples``
            (:func:`lime_standard_error`).
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
        token_baseline: the embedding of masked tokens, "mean" or "zero" (token space,
            ``removal="blend"``), see :func:`token_masking`.
        removal: token space: "blend" (masked tokens become ``token_baseline``), "drop"
            (removed from the sequence: cheaper forwards) or "attention_mask"
            (:mod:`~vitxai.methods.perturbation.removal`).
        grid: token space: None (every patch a feature) or cells per side of a grid × grid
            partition of the patch grid, each cell one feature (≥ 1, at most the patch grid;
            :func:`~vitxai.methods.perturbation.features.patch_segments`): fewer features,
            fewer samples for the same error.
        paired: draw coalitions in pairs (z, 1 − z) after the first row (antithetic
            sampling; each row is still Bernoulli(0.5)), see :func:`lime_coalitions`.
        sampling: "bernoulli" (independent rows, as lime_image) or "orthogonal" (rows of
            randomised orthogonal arrays, each row still Bernoulli(0.5); with ``paired``
            they are foldovers, see :func:`orthogonal_rows`): the same regression with
            fewer samples.
        surrogate: None, or "logistic": fit σ(a + b·z + Σ c_jk z_j z_k) (a few pairwise
            interactions, :func:`~vitxai.methods.perturbation.surrogate.fit_logistic`) to
            the sampled scores, take the
            coefficients of its LIME regression from many coalitions (no model call) and
            fit only the residual to the samples (:func:`adjusted_ridge`); needs
            ``score="probability"``.
        tolerance: ``n_samples="auto"``: stop once max_j SE(β_j) / (max β − min β) is below
            this (> 0).
        max_samples: ``n_samples="auto"``: coalitions per image at most (≥ 2).
    """

    n_samples: SampleCount = 1000
    batch_size: int | None = None
    kernel_width: float = 0.25
    alpha: float = 1.0
    score: Score = "probability"
    baseline: ColourBaseline = "mean"
    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    space: Space = "pixel"
    token_baseline: TokenBaseline = "mean"
    removal: Removal = field(default="blend", metadata=RECORDED_WHEN_SET)
    grid: int | None = field(default=None, metadata=RECORDED_WHEN_SET)
    paired: bool = field(default=False, metadata=RECORDED_WHEN_SET)
    sampling: LimeSampling = field(default="bernoulli", metadata=RECORDED_WHEN_SET)
    surrogate: Surrogate | None = field(default=None, metadata=RECORDED_WHEN_SET)
    tolerance: float = field(default=0.05, metadata=RECORDED_WHEN_SET)
    max_samples: int = field(default=4000, metadata=RECORDED_WHEN_SET)

    def __post_init__(self) -> None:
        check_stopping(self.n_samples, self.tolerance, self.max_samples, 2)
        check_choice("sampling", self.sampling, ("bernoulli", "orthogonal"))
        check_surrogate(self.surrogate, self.score)
        check_batch_size("batch_size", self.batch_size)
        check_range("kernel_width", self.kernel_width, 0, None, low_open=True)
        check_range("alpha", self.alpha, 0, None)
        check_score(self.score)
        check_colour_baseline(self.baseline)
        check_space(self.space, self.token_baseline)
        check_removal(self.removal, self.space)
        check_feature_grid(self.grid, self.space)
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


def orthogonal_rows(n: int, s: int, paired: bool, generator: torch.Generator
                    ) -> torch.Tensor:
    """n rows of randomised binary orthogonal arrays, (n, s) bool; each row alone is
    uniform on {0, 1}^s, i.e. s Bernoulli(0.5) draws.

    The rows come in blocks of 2^k: the codewords c_j(u) = ⟨g_j, u⟩ mod 2, u ∈ GF(2)^k, of a
    random linear code with distinct generators g_j ∈ GF(2)^k, XOR a uniform random shift
    (which makes each row uniform) and in random order. Distinct nonzero generators make
    every two columns take each of their four value pairs equally often within a block
    (strength 2). With ``paired`` every g_j has the top bit set, so no three of them sum to
    zero: every three columns are balanced (strength 3, a resolution IV fractional
    factorial), and u and u + top give complementary rows, placed at 2i and 2i + 1 — the
    foldover of Box & Hunter 1961 ("The 2^(k−p) fractional factorial designs",
    Technometrics). Randomising orthogonal arrays keeps sample means unbiased while
    balancing the low-order terms of the integrand exactly (Owen 1992, "Orthogonal arrays for
    computer experiments, integration and visualization", Statistica Sinica). Each block has
    a fresh code and shift; the last is cut to length, a uniform subset of its rows (pairs)
    since they are in random order. k is the least with 2^(k−1) ≥ s (paired) or
    2^k − 1 ≥ s, so a block is at most 4s rows.
    """
    low = math.ceil(math.log2(s)) if paired else math.ceil(math.log2(s + 1))
    k = low + 1 if paired else low
    blocks = -(-n // 2**k)
    # ranks of uniforms: a random permutation per block
    if paired:  # generators top | (distinct low parts); u and u + top adjacent
        gen = torch.rand(blocks, 2**low, generator=generator).argsort(1)[:, :s] + 2**low
        half = torch.rand(blocks, 2**low, generator=generator).argsort(1)
        u = torch.stack([half, half + 2**low], dim=2).reshape(blocks, -1)
    else:  # distinct nonzero generators
        gen = torch.rand(blocks, 2**k - 1, generator=generator).argsort(1)[:, :s] + 1
        u = torch.rand(blocks, 2**k, generator=generator).argsort(1)
    bits = 2 ** torch.arange(k)
    u_bits = (u[..., None] & bits).ne(0).double()  # (blocks, 2^k, k)
    g_bits = (gen[..., None] & bits).ne(0).double()  # (blocks, s, k)
    code = (u_bits @ g_bits.transpose(1, 2)).long() % 2
    shift = torch.randint(0, 2, (blocks, 1, s), generator=generator)
    return (code ^ shift).bool().reshape(-1, s)[:n]


def lime_coalitions(context: BatchContext, counts: torch.Tensor, n_samples: int,
                    paired: bool = False, sampling: LimeSampling = "bernoulli"
                    ) -> torch.Tensor:
    """(B, n_samples, S_max) bool: Bernoulli(0.5) rows, the first all ones, padding False.

    Drawn per image from ``context.generator(i, "lime")``, so each image's coalitions do not
    depend on the rest of the batch. ``paired``: rows 1 + 2i and 2 + 2i are complements
    (z, 1 − z) (an even count drops the last complement). ``sampling="orthogonal"``: rows
    1, 2, … are :func:`orthogonal_rows` (paired as above when ``paired``).
    """
    s_max = int(counts.max())
    z = torch.zeros(len(counts), n_samples, s_max, dtype=torch.bool)
    for i, s in enumerate(counts.tolist()):
        g = context.generator(i, "lime")
        if sampling == "orthogonal":
            z[i, 1:, :s] = orthogonal_rows(n_samples - 1, s, paired, g)
        elif paired:
            half = torch.randint(0, 2, (n_samples // 2, s), generator=g).bool()
            rows = torch.stack([half, ~half], dim=1).reshape(-1, s)[:n_samples - 1]
            z[i, 1:, :s] = rows
        else:
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
    if params.space == "token":
        check_token_removal(token_vit(adapter, "lime"), params.removal, "lime")
    segments = feature_segments(adapter, images, context, "lime", params.space,
                                params.segmentation, params.grid)
    counts = num_segments(segments)
    areas = feature_areas(segments, counts)
    auto = params.n_samples == "auto"
    z = lime_coalitions(context, counts, params.max_samples if auto else params.n_samples,
                        params.paired, params.sampling)

    def evaluate(valid: torch.Tensor | None = None) -> torch.Tensor:
        return evaluate_coalitions(adapter, images, segments, z, targets,
                                   baseline=params.baseline, score=params.score,
                                   batch_size=params.batch_size, valid=valid,
                                   space=params.space, token_baseline=params.token_baseline,
                                   removal=params.removal)

    w = lime_weights(z, counts, params.kernel_width)
    images_at = torch.arange(len(counts))

    def fit(active: torch.Tensor, x: torch.Tensor, yy: torch.Tensor, ww: torch.Tensor
            ) -> RidgeFit:
        # fresh generators per fit: each round's adjustment depends on its samples only
        generators = [context.generator(i, "lime surrogate") for i in images_at[active].tolist()]
        return adjusted_ridge(x, yy, ww, params.alpha, counts[active], params.kernel_width,
                              params.surrogate, generators, areas[active])

    if not auto:
        coef = fit(images_at, z.double(), evaluate(), w).coef
        return feature_attribution("lime", coef, segments, counts, params.space, images,
                                   targets, Cost(forward=params.n_samples))
    y = torch.full(z.shape[:2], math.nan, dtype=torch.float64)

    def evaluate_round(active: torch.Tensor, lo: int, hi: int) -> None:
        rows = torch.zeros(z.shape[:2], dtype=torch.bool)
        rows[active, lo:hi] = True
        y[rows] = evaluate(rows)[rows]

    def estimate(active: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, yy, ww = z[active, :n].double(), y[active, :n], w[active, :n]
        f = fit(active, x, yy, ww)
        se = lime_standard_error(x, f.game, ww, params.alpha, f.game_coef, f.game_intercept,
                                 counts[active], params.paired, f.surrogate_parameters)
        real = torch.arange(z.shape[2])[None] < counts[active, None]
        return f.coef, convergence_ratio(f.coef, se, real)

    first = max(64, 2 * int(counts.max())) | int(params.paired)  # odd: whole pairs
    coef, ratio, used = sample_until(len(counts), schedule(first, params.max_samples,
                                                           2 if params.paired else 1),
                                     evaluate_round, estimate, params.tolerance)
    result = feature_attribution("lime", coef, segments, counts, params.space, images, targets,
                                 Cost(forward=math.ceil(int(used.sum()) / len(used))))
    result.standard_error, result.evaluations = ratio, used
    return result


class RidgeFit(NamedTuple):
    """LIME's coefficients and what their standard error reads (all float64)."""

    coef: torch.Tensor  #: (A, S_max) the estimate
    game: torch.Tensor  #: (A, n) the scores fitted to the samples: y, or y − ĝ
    game_coef: torch.Tensor  #: (A, S_max) the ridge fit of ``game``
    game_intercept: torch.Tensor  #: (A,)
    surrogate_parameters: torch.Tensor  #: (A,) effective parameters of ĝ's fit (0: none)


def adjusted_ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float,
                   counts: torch.Tensor, kernel_width: float, surrogate: Surrogate | None,
                   generators: list[torch.Generator], areas: torch.Tensor) -> RidgeFit:
    """:func:`weighted_ridge`, regression-adjusted by ``surrogate``.

    LIME's fit is linear in the scores, so β(y) = β(ĝ) + β(y − ĝ): with a logistic ĝ fitted
    to the samples (:func:`~vitxai.methods.perturbation.surrogate.fit_logistic`, LIME's
    kernel weights), β(ĝ) is computed on ``POPULATION_ROWS`` fresh Bernoulli(½) coalitions
    with their kernel weights (no model call; the ridge scaled by their number over n, so it
    shrinks as much as on the samples) and only β(y − ĝ) on the n samples.

    Args:
        x: (A, n, S_max) coalitions. y: (A, n) scores. w: (A, n) kernel weights.
        alpha: ridge penalty. counts: (A,) S_a. kernel_width: LIME's kernel width.
        surrogate: None or "logistic". generators: one per image, for the fresh coalitions.
        areas: (A, S_max) the features' areas, the surrogate's prior (:func:`fit_logistic`).
    """
    none = torch.zeros(x.shape[0], dtype=torch.float64)
    if surrogate is None:
        coef, intercept = weighted_ridge(x, y, w, alpha)
        return RidgeFit(coef, y, coef, intercept, none)
    coef = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    fitted = torch.zeros_like(y, dtype=torch.float64)
    parameters = none.clone()
    n = x.shape[1]
    for a, s in enumerate(counts.tolist()):
        rows = x[a, :, :s]
        g = fit_logistic(rows, y[a], w[a], areas=areas[a, :s])
        fitted[a] = g(rows)
        parameters[a] = g.parameters
        fresh = (torch.rand(POPULATION_ROWS, s, generator=generators[a]) < 0.5).double()
        fresh_w = lime_weights(fresh[None], counts[a:a + 1], kernel_width)[0]
        # the normal equations: well conditioned at 20,000 rows, and 50× faster than gelsd
        centred = fresh - (fresh_w[:, None] * fresh).sum(0) / fresh_w.sum()
        gram = centred.T @ (fresh_w[:, None] * centred)
        gram.diagonal().add_(alpha * POPULATION_ROWS / n)
        coef[a, :s] = torch.linalg.solve(gram, centred.T @ (fresh_w * g(fresh)))
    game = y - fitted
    game_coef, game_intercept = weighted_ridge(x, game, w, alpha)
    return RidgeFit(coef + game_coef, game, game_coef, game_intercept, parameters)


def lime_standard_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float,
                        coef: torch.Tensor, intercept: torch.Tensor, counts: torch.Tensor,
                        paired: bool = False,
                        surrogate_parameters: torch.Tensor | None = None) -> torch.Tensor:
    """Estimated standard errors of LIME's coefficients, (A, p) float64 (0 on padding).

    The delta-method (sandwich) estimate for weighted ridge regression (White 1980, "A
    Heteroskedasticity-Consistent Covariance Matrix Estimator", Econometrica): with centred
    coalitions x̃_i, H = Σ_i w_i x̃_i x̃_iᵀ + αI and residuals r_i, one coalition moves the
    coefficients by H⁻¹ x̃_i w_i r_i, so Var β_j ≈ Σ_i (H⁻¹ x̃_i w_i r_i)_j², scaled by
    U / (U − S − k) for U independent units (HC1: the residuals are partly fitted away; k
    the effective parameters of a surrogate fitted to the same samples, whose game y − ĝ is
    then passed as ``y``; the units are the rows, or with ``paired`` the first row and the
    pairs, whose moves add up before squaring;
    :func:`~vitxai.methods.perturbation.stopping.sandwich_standard_error`); inf while
    U ≤ S + k. It measures the sampling noise of the fit, not the ridge's shrinkage. Over
    repeated draws it matches the spread of the fitted coefficients (tests/test_tokendrop.py),
    at the cost of one S × S solve per round, where a bootstrap over coalitions would refit
    n × S problems per resample.

    Args:
        x: (A, n, p) coalitions. y: (A, n) scores. w: (A, n) kernel weights. alpha: ridge
            penalty. coef, intercept: the fit (:func:`weighted_ridge`). counts: (A,) S_a.
        paired: rows 1 + 2i and 2 + 2i are pairs (:func:`lime_coalitions`).
        surrogate_parameters: (A,) k above (:class:`RidgeFit`); None: 0.
    """
    se = torch.zeros_like(coef)
    n = x.shape[1]
    units = unit_count(n, paired, single=1)  # row 0 is unpaired
    for a, s in enumerate(counts.tolist()):
        fitted = s + (0.0 if surrogate_parameters is None else float(surrogate_parameters[a]))
        if units <= fitted:
            se[a, :s] = math.inf
            continue
        xa, wa = x[a, :, :s], w[a]
        centred = xa - (wa[:, None] * xa).sum(0) / wa.sum()
        r = y[a] - intercept[a] - xa @ coef[a, :s]
        h = centred.T @ (wa[:, None] * centred) + alpha * torch.eye(s, dtype=xa.dtype)
        moves = torch.linalg.solve(h, (centred * (wa * r)[:, None]).T)  # (S, n)
        se[a, :s] = sandwich_standard_error(moves, paired, fitted, single=1)
    return se
